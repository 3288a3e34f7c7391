//! Replay mode: DUIS XML request files (as Service Users send them to the DCC) turned into
//! REQUEST frames.
//!
//! Each file is parsed with a real XML parser (roxmltree, namespace-aware), taking from its
//! header:
//!
//! * `RequestID`: `su-id:device-id:counter`, the three EUI-64/counter fields of the frame;
//! * `ServiceReferenceVariant`: the SRV;
//! * `ExecutionDateTime`, if present: a request to be executed in the future is future-dated
//!   (mode 1); one without it, or dated in the past, is on-demand (mode 0).
//!
//! The file's bytes are the payload, byte for byte (the load generator appends its check trailer).

use std::path::{Path, PathBuf};

use crate::ids::{Eui64, Mode, Srv};

/// The DUIS namespace of the Service User Gateway.
pub const DUIS_NS: &str = "http://www.dccinterface.co.uk/ServiceUserGateway";

/// Why a file cannot be replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Not well-formed XML.
    #[error("not XML: {0}")]
    Xml(#[from] roxmltree::Error),
    /// A header element is missing.
    #[error("no <{0}> in the request header")]
    Missing(&'static str),
    /// A header element has a value that cannot be used.
    #[error("bad <{element}> {value:?}: {why}")]
    Bad {
        /// The element.
        element: &'static str,
        /// Its text.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file of the directory is not a request.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<ReplayError>,
    },
    /// The directory has no request file.
    #[error("{0}: no DUIS request file (*.xml) in it")]
    Empty(PathBuf),
}

/// A DUIS request, as read from its XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuisRequest {
    /// The originating Service User (first part of the RequestID).
    pub su: Eui64,
    /// The target device (second part).
    pub device: Eui64,
    /// The counter (third part).
    pub counter: u64,
    /// The Service Reference Variant.
    pub srv: Srv,
    /// `ExecutionDateTime`, in ns since the Unix epoch, if present.
    pub execution_ns: Option<i128>,
}

impl DuisRequest {
    /// The mode of operation at `now_ns` (ns since the Unix epoch): future-dated when the
    /// execution time is still ahead, else on-demand.
    pub fn mode_at(&self, now_ns: i128) -> Mode {
        match self.execution_ns {
            Some(at) if at > now_ns => Mode::FutureDated,
            _ => Mode::OnDemand,
        }
    }
}

/// One replayable file: the request and its bytes.
#[derive(Debug, Clone)]
pub struct ReplayFile {
    /// File name, for the report.
    pub name: String,
    /// What its header says.
    pub request: DuisRequest,
    /// The file's text, sent as the payload.
    pub text: String,
}

/// Parses one DUIS request.
///
/// # Errors
///
/// Malformed XML, or a header without a usable RequestID or ServiceReferenceVariant.
pub fn parse_request(text: &str) -> Result<DuisRequest, ReplayError> {
    let doc = roxmltree::Document::parse(text)?;
    let header = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name((DUIS_NS, "Header")))
        .ok_or(ReplayError::Missing("Header"))?;
    let field = |name: &'static str| {
        header
            .children()
            .find(|n| n.has_tag_name((DUIS_NS, name)))
            .map(|n| n.text().unwrap_or_default().trim().to_owned())
    };
    let request_id = field("RequestID").ok_or(ReplayError::Missing("RequestID"))?;
    let srv_text =
        field("ServiceReferenceVariant").ok_or(ReplayError::Missing("ServiceReferenceVariant"))?;
    let bad = |element: &'static str, value: &str, why: String| ReplayError::Bad {
        element,
        value: value.to_owned(),
        why,
    };
    let mut parts = request_id.split(':');
    let (Some(su), Some(device), Some(counter), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "RequestID",
            &request_id,
            "expected SU-ID:DEVICE-ID:COUNTER".into(),
        ));
    };
    let su: Eui64 = su
        .parse()
        .map_err(|e: crate::ids::IdError| bad("RequestID", &request_id, e.to_string()))?;
    let device: Eui64 = device
        .parse()
        .map_err(|e: crate::ids::IdError| bad("RequestID", &request_id, e.to_string()))?;
    let counter: u64 = counter
        .parse()
        .map_err(|e: std::num::ParseIntError| bad("RequestID", &request_id, e.to_string()))?;
    let srv: Srv = srv_text.parse().map_err(|e: crate::ids::IdError| {
        bad("ServiceReferenceVariant", &srv_text, e.to_string())
    })?;
    let execution_ns = match field("ExecutionDateTime") {
        Some(t) => Some(
            parse_datetime_ns(&t)
                .ok_or_else(|| bad("ExecutionDateTime", &t, "expected xs:dateTime".into()))?,
        ),
        None => None,
    };
    Ok(DuisRequest {
        su,
        device,
        counter,
        srv,
        execution_ns,
    })
}

/// Reads every `*.xml` file (any case) of `dir` that is a DUIS request, in name order. Files
/// whose root is not a `Request` (responses, acknowledgements) are skipped.
///
/// # Errors
///
/// An unreadable directory or file, a request that does not parse, or no request at all.
pub fn load_dir(dir: &Path) -> Result<Vec<ReplayFile>, ReplayError> {
    let io = |source| ReplayError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("xml"))
        })
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| ReplayError::Io {
            path: path.clone(),
            source,
        })?;
        let wrap = |e: ReplayError| ReplayError::File {
            path: path.clone(),
            source: Box::new(e),
        };
        let doc = roxmltree::Document::parse(&text).map_err(|e| wrap(e.into()))?;
        if !doc.root_element().has_tag_name((DUIS_NS, "Request")) {
            continue;
        }
        let request = parse_request(&text).map_err(wrap)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(ReplayFile {
            name,
            request,
            text,
        });
    }
    if out.is_empty() {
        return Err(ReplayError::Empty(dir.to_owned()));
    }
    Ok(out)
}

/// Parses an `xs:dateTime` (`2014-12-31T23:59:10.00Z`, `…+01:00`, or no zone = UTC) into ns since
/// the Unix epoch.
pub fn parse_datetime_ns(text: &str) -> Option<i128> {
    let text = text.trim();
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Zone: Z, +hh:mm, -hh:mm or none.
    let (clock, offset_s) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0i64)
    } else if let Some(at) = time.rfind(['+', '-']) {
        let (c, zone) = time.split_at(at);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (h, m) = zone[1..].split_once(':')?;
        let h: i64 = h.parse().ok()?;
        let m: i64 = m.parse().ok()?;
        (c, sign * (h * 3600 + m * 60))
    } else {
        (time, 0)
    };
    let mut t = clock.splitn(3, ':');
    let hour: i64 = t.next()?.parse().ok()?;
    let minute: i64 = t.next()?.parse().ok()?;
    let seconds = t.next()?;
    let (whole, frac) = seconds.split_once('.').unwrap_or((seconds, ""));
    let second: i64 = whole.parse().ok()?;
    if hour > 24 || minute > 59 || second > 60 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut frac_ns: i128 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        frac_ns += i128::from(b - b'0') * 10i128.pow(8 - i as u32);
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Some(i128::from(secs) * 1_000_000_000 + frac_ns)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DUIS_REQUEST_SAMPLES;

    #[test]
    fn reads_the_real_samples() {
        let (_, text) = DUIS_REQUEST_SAMPLES[0];
        let r = parse_request(text).unwrap();
        assert_eq!(r.su.to_string(), "90-B3-D5-1F-30-01-00-00");
        assert_eq!(r.device.to_string(), "00-DB-12-34-56-78-90-A0");
        assert_eq!(r.counter, 12_884_901_888);
        assert_eq!(r.srv, "2.2".parse().unwrap());
        assert_eq!(r.execution_ns, None);
        assert_eq!(r.mode_at(0), Mode::OnDemand);
        let srvs: Vec<String> = DUIS_REQUEST_SAMPLES
            .iter()
            .map(|(_, t)| parse_request(t).unwrap().srv.to_string())
            .collect();
        assert_eq!(srvs, ["2.2", "4.1.1", "4.6.1", "7.1", "8.1.1"]);
    }

    #[test]
    fn execution_date_time_in_the_future_is_future_dated() {
        let (_, text) = DUIS_REQUEST_SAMPLES[3];
        let dated = text.replace(
            "</sr:ServiceReferenceVariant>",
            "</sr:ServiceReferenceVariant>\n    <sr:ExecutionDateTime>2099-01-01T00:00:00.00Z</sr:ExecutionDateTime>",
        );
        let r = parse_request(&dated).unwrap();
        let at = r.execution_ns.unwrap();
        assert_eq!(at, 4_070_908_800 * 1_000_000_000);
        assert_eq!(r.mode_at(1_700_000_000_000_000_000), Mode::FutureDated);
        assert_eq!(r.mode_at(at + 1), Mode::OnDemand, "past: on-demand");
    }

    #[test]
    fn datetimes() {
        assert_eq!(parse_datetime_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_datetime_ns("2014-12-31T23:59:10.25Z"),
            Some(1_420_070_350_250_000_000)
        );
        assert_eq!(
            parse_datetime_ns("2014-12-31T23:59:10+01:00"),
            Some(1_420_066_750_000_000_000)
        );
        assert_eq!(parse_datetime_ns("yesterday"), None);
        assert_eq!(parse_datetime_ns("2014-13-01T00:00:00Z"), None);
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        assert!(matches!(parse_request("<a"), Err(ReplayError::Xml(_))));
        assert!(matches!(
            parse_request(&format!("<sr:Request xmlns:sr=\"{DUIS_NS}\"/>")),
            Err(ReplayError::Missing("Header"))
        ));
        let bad_id = format!(
            "<sr:Request xmlns:sr=\"{DUIS_NS}\"><sr:Header><sr:RequestID>x:y</sr:RequestID><sr:ServiceReferenceVariant>2.2</sr:ServiceReferenceVariant></sr:Header></sr:Request>"
        );
        assert!(matches!(
            parse_request(&bad_id),
            Err(ReplayError::Bad {
                element: "RequestID",
                ..
            })
        ));
    }

    #[test]
    fn loads_the_bundled_sample_directory_skipping_responses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/duis-samples");
        let files = load_dir(&dir).unwrap();
        assert_eq!(files.len(), 5, "five requests; two responses skipped");
        assert!(files.iter().all(|f| f.text.contains("RequestID")));
    }
}
