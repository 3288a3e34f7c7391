//! The real domain data the traffic is drawn from, embedded so the crate builds and runs
//! standalone: the SRV catalogue (129 Service Reference Variants), the GBCS alert codes (184) and
//! the DUIS sample messages, all copied from `shared/data/` into the repository's `data/`.
//!
//! Parsing is done once at start-up; nothing here is on the message path.

use std::collections::HashMap;

use crate::ids::{Mode, Srv};

use crate::replay;

/// `srv-catalogue.csv`.
const SRV_CATALOGUE_CSV: &str = include_str!("../../../data/srv-catalogue.csv");
/// `gbcs-alert-codes.csv`.
const ALERT_CODES_CSV: &str = include_str!("../../../data/gbcs-alert-codes.csv");

/// The DUIS request samples, by file name.
pub const DUIS_REQUEST_SAMPLES: [(&str, &str); 5] = [
    (
        "CS01a_2.2_SUCCESS_REQUEST_DUIS.XML",
        include_str!("../../../data/duis-samples/CS01a_2.2_SUCCESS_REQUEST_DUIS.XML"),
    ),
    (
        "ECS17b_4.1.1_REQUEST_DUIS.XML",
        include_str!("../../../data/duis-samples/ECS17b_4.1.1_REQUEST_DUIS.XML"),
    ),
    (
        "ECS21a_4.6.1_SINGLE_SUCCESS_REQUEST_DUIS.XML",
        include_str!("../../../data/duis-samples/ECS21a_4.6.1_SINGLE_SUCCESS_REQUEST_DUIS.XML"),
    ),
    (
        "ECS42_7.1_SUCCESS_REQUEST_DUIS.XML",
        include_str!("../../../data/duis-samples/ECS42_7.1_SUCCESS_REQUEST_DUIS.XML"),
    ),
    (
        "ECS70Commission_8.1.1_SUCCESS_REQUEST_DUIS.XML",
        include_str!("../../../data/duis-samples/ECS70Commission_8.1.1_SUCCESS_REQUEST_DUIS.XML"),
    ),
];

/// A DUIS success response (Read Firmware Version, with a GBCS payload).
const DUIS_RESPONSE_SAMPLE: &str = include_str!("../../../data/duis-samples/readfw-response.xml");
/// A DUIS error acknowledgement (E65).
const DUIS_ERROR_SAMPLE: &str =
    include_str!("../../../data/duis-samples/acknowledgement-error.xml");

/// One row of the SRV catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvInfo {
    /// The Service Reference Variant.
    pub srv: Srv,
    /// Its DUIS name ("Top Up Device").
    pub name: String,
    /// Whether it may be sent on demand.
    pub on_demand: bool,
    /// Whether it may be future-dated (the catalogue names who holds it: DSP or Device).
    pub future_dated: bool,
    /// Whether it may be DCC-scheduled.
    pub dcc_scheduled: bool,
}

impl SrvInfo {
    /// The modes this SRV may be sent in, on-demand first.
    pub fn modes(&self) -> impl Iterator<Item = Mode> + '_ {
        [
            (self.on_demand, Mode::OnDemand),
            (self.future_dated, Mode::FutureDated),
            (self.dcc_scheduled, Mode::DccScheduled),
        ]
        .into_iter()
        .filter(|(ok, _)| *ok)
        .map(|(_, m)| m)
    }
}

/// One GBCS alert code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertInfo {
    /// The code (0x8F75).
    pub code: u16,
    /// Its name.
    pub name: String,
}

/// A payload template with one hole for the DUIS RequestID (`su:device:counter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Bytes before the RequestID.
    pub before: String,
    /// Bytes after it.
    pub after: String,
}

impl Template {
    /// Splits `text` at its `<sr:RequestID>` element's text; a text without one gets the
    /// RequestID in an XML comment at the end, so every payload still names its request.
    pub fn around_request_id(text: &str) -> Template {
        const OPEN: &str = "<sr:RequestID>";
        const CLOSE: &str = "</sr:RequestID>";
        if let Some(start) = text.find(OPEN) {
            let from = start + OPEN.len();
            if let Some(len) = text[from..].find(CLOSE) {
                return Template {
                    before: text[..from].to_owned(),
                    after: text[from + len..].to_owned(),
                };
            }
        }
        Template {
            before: format!("{text}<!-- RequestID "),
            after: " -->".to_owned(),
        }
    }

    /// The template's length with a RequestID of `id_len` bytes.
    pub fn len_with(&self, id_len: usize) -> usize {
        self.before.len() + id_len + self.after.len()
    }
}

/// Everything the generator draws from.
#[derive(Debug)]
pub struct Catalogue {
    /// Every SRV, in file order.
    pub srvs: Vec<SrvInfo>,
    /// Every alert code, in file order.
    pub alerts: Vec<AlertInfo>,
    request_templates: HashMap<Srv, Template>,
    response_templates: HashMap<Srv, Template>,
    error_template: Template,
    alert_templates: HashMap<u16, Template>,
}

/// Why the embedded data could not be read (a broken copy in `data/`: a build-time mistake).
#[derive(Debug, thiserror::Error)]
#[error("embedded data {file}, line {line}: {what}")]
pub struct DataError {
    file: &'static str,
    line: usize,
    what: String,
}

impl Catalogue {
    /// Parses the embedded files.
    ///
    /// # Errors
    ///
    /// A malformed row in one of the embedded CSV files or a sample that is not DUIS XML.
    pub fn embedded() -> Result<Catalogue, DataError> {
        let srvs = parse_srv_catalogue(SRV_CATALOGUE_CSV)?;
        let alerts = parse_alert_codes(ALERT_CODES_CSV)?;

        // Requests: the real DUIS samples where there is one for the SRV, else a request built
        // in the same shape (header, an empty body element named after the service).
        let mut request_templates = HashMap::new();
        for (name, text) in DUIS_REQUEST_SAMPLES {
            let parsed = replay::parse_request(text).map_err(|e| DataError {
                file: name,
                line: 0,
                what: e.to_string(),
            })?;
            request_templates.insert(parsed.srv, Template::around_request_id(text));
        }
        for info in &srvs {
            request_templates
                .entry(info.srv)
                .or_insert_with(|| Template::around_request_id(&synthetic_request(info)));
        }
        // Responses: the real Read Firmware Version response with its SRV changed.
        let response_templates = srvs
            .iter()
            .map(|info| {
                let srv = info.srv.to_string();
                let text = DUIS_RESPONSE_SAMPLE
                    .replace(
                        "<sr:ServiceReferenceVariant>11.2</sr:ServiceReferenceVariant>",
                        &format!("<sr:ServiceReferenceVariant>{srv}</sr:ServiceReferenceVariant>"),
                    )
                    .replace(
                        "<sr:ServiceReference>11.2</sr:ServiceReference>",
                        &format!(
                            "<sr:ServiceReference>{}.{}</sr:ServiceReference>",
                            info.srv.major(),
                            info.srv.minor()
                        ),
                    );
                (info.srv, Template::around_request_id(&text))
            })
            .collect();
        let alert_templates = alerts
            .iter()
            .map(|a| (a.code, Template::around_request_id(&alert_xml(a))))
            .collect();
        Ok(Catalogue {
            srvs,
            alerts,
            request_templates,
            response_templates,
            error_template: Template::around_request_id(DUIS_ERROR_SAMPLE),
            alert_templates,
        })
    }

    /// The SRV catalogue entry of `srv`.
    pub fn srv(&self, srv: Srv) -> Option<&SrvInfo> {
        self.srvs.iter().find(|s| s.srv == srv)
    }

    /// The request template of `srv` (every catalogue SRV has one).
    pub fn request_template(&self, srv: Srv) -> &Template {
        self.request_templates
            .get(&srv)
            .unwrap_or(&self.error_template)
    }

    /// The response template of `srv`; `error` gives the DUIS error acknowledgement instead.
    pub fn response_template(&self, srv: Srv, error: bool) -> &Template {
        if error {
            return &self.error_template;
        }
        self.response_templates
            .get(&srv)
            .unwrap_or(&self.error_template)
    }

    /// The alert template of `code`.
    pub fn alert_template(&self, code: u16) -> &Template {
        self.alert_templates
            .get(&code)
            .unwrap_or(&self.error_template)
    }

    /// SRVs whose number starts with `prefix` ("4." or "7." or exactly "2.2") that allow `mode`.
    pub fn srvs_matching(&self, prefix: &str, mode: Mode) -> Vec<Srv> {
        self.srvs
            .iter()
            .filter(|s| {
                let text = s.srv.to_string();
                (text == prefix || (prefix.ends_with('.') && text.starts_with(prefix)))
                    && s.modes().any(|m| m == mode)
            })
            .map(|s| s.srv)
            .collect()
    }
}

/// A DUIS request in the shape of the samples for an SRV that has no sample.
fn synthetic_request(info: &SrvInfo) -> String {
    let element: String = info
        .name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut cs = w.chars();
            cs.next()
                .map(|c| c.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<sr:Request xmlns:sr=\"http://www.dccinterface.co.uk/ServiceUserGateway\" schemaVersion=\"5.4\">\n  <sr:Header>\n    <sr:RequestID></sr:RequestID>\n    <sr:CommandVariant>1</sr:CommandVariant>\n    <sr:ServiceReference>{}.{}</sr:ServiceReference>\n    <sr:ServiceReferenceVariant>{}</sr:ServiceReferenceVariant>\n  </sr:Header>\n  <sr:Body>\n    <sr:{element}/>\n  </sr:Body>\n</sr:Request>\n",
        info.srv.major(),
        info.srv.minor(),
        info.srv
    )
}

/// A DUIS device alert (the `sr:DeviceAlertMessage` response shape) for one GBCS code.
fn alert_xml(alert: &AlertInfo) -> String {
    let name = alert
        .name
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><sr:Response xmlns:sr=\"http://www.dccinterface.co.uk/ServiceUserGateway\" schemaVersion=\"5.1\"><sr:Header><sr:RequestID></sr:RequestID><sr:ResponseCode>I0</sr:ResponseCode></sr:Header><sr:Body><sr:DeviceAlertMessage><sr:AlertCode>{:04X}</sr:AlertCode><!-- {name} --></sr:DeviceAlertMessage></sr:Body></sr:Response>",
        alert.code
    )
}

/// Splits CSV text into records of fields (RFC 4180: quoted fields may hold commas, doubled
/// quotes and line breaks, as the catalogue's 8.2 row does). Returns (first line, fields).
pub fn parse_csv(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                line += 1;
                fields.push(std::mem::take(&mut field));
                if !(fields.len() == 1 && fields[0].is_empty()) {
                    records.push((record_line, std::mem::take(&mut fields)));
                }
                fields.clear();
                record_line = line;
            }
            (_, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
        }
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push((record_line, fields));
    }
    records
}

fn yes(field: &str) -> bool {
    field.trim().eq_ignore_ascii_case("yes")
}

fn parse_srv_catalogue(text: &str) -> Result<Vec<SrvInfo>, DataError> {
    let file = "srv-catalogue.csv";
    let mut out = Vec::new();
    for (line, fields) in parse_csv(text).into_iter().skip(1) {
        let bad = |what: String| DataError { file, line, what };
        if fields.len() < 7 {
            return Err(bad(format!("expected 8 columns, got {}", fields.len())));
        }
        let srv: Srv = fields[0]
            .trim()
            .parse()
            .map_err(|e: crate::ids::IdError| bad(e.to_string()))?;
        out.push(SrvInfo {
            srv,
            name: fields[1].split_whitespace().collect::<Vec<_>>().join(" "),
            on_demand: yes(&fields[3]),
            future_dated: !fields[4].trim().eq_ignore_ascii_case("no"),
            dcc_scheduled: yes(&fields[5]),
        });
    }
    Ok(out)
}

fn parse_alert_codes(text: &str) -> Result<Vec<AlertInfo>, DataError> {
    let file = "gbcs-alert-codes.csv";
    let mut out = Vec::new();
    for (line, fields) in parse_csv(text).into_iter().skip(1) {
        let bad = |what: String| DataError { file, line, what };
        let code_text = fields.first().map(|s| s.trim()).unwrap_or_default();
        let hex = code_text
            .strip_prefix("0x")
            .or_else(|| code_text.strip_prefix("0X"))
            .ok_or_else(|| bad(format!("alert code {code_text:?} is not 0x-prefixed hex")))?;
        let code = u16::from_str_radix(hex, 16)
            .map_err(|e| bad(format!("alert code {code_text:?}: {e}")))?;
        out.push(AlertInfo {
            code,
            name: fields.get(1).cloned().unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_data_parses_completely() {
        let c = Catalogue::embedded().unwrap();
        assert_eq!(c.srvs.len(), 129, "every SRV of the catalogue");
        assert_eq!(c.alerts.len(), 184, "every alert code");
        let read_inventory = c.srv("8.2".parse().unwrap()).unwrap();
        assert_eq!(
            read_inventory.name,
            "Read Inventory (Current and Future Suppliers may use this Service Request)"
        );
        assert!(c.alerts.iter().any(|a| a.code == 0x8F75));
        // The real sample is used for 2.2.
        assert!(c
            .request_template("2.2".parse().unwrap())
            .after
            .contains("<sr:UTRN>"));
        assert!(c
            .srvs_matching("4.", Mode::DccScheduled)
            .contains(&"4.6.1".parse().unwrap()));
        assert!(!c
            .srvs_matching("4.", Mode::DccScheduled)
            .contains(&"4.1.1".parse().unwrap()));
        assert_eq!(
            c.srvs_matching("2.2", Mode::OnDemand),
            vec!["2.2".parse().unwrap()]
        );
    }

    #[test]
    fn csv_handles_quotes_and_line_breaks() {
        let rows = parse_csv("a,b\n1,\"x, \"\"y\"\"\nz\"\n2,w\n");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].1, vec!["1".to_owned(), "x, \"y\"\nz".to_owned()]);
        assert_eq!(rows[2].0, 4);
    }

    #[test]
    fn every_template_has_its_request_id_hole() {
        let c = Catalogue::embedded().unwrap();
        for s in &c.srvs {
            let t = c.request_template(s.srv);
            assert!(t.before.ends_with("<sr:RequestID>"), "{}", s.srv);
            assert!(t.after.starts_with("</sr:RequestID>"), "{}", s.srv);
            let full = format!(
                "{}90-B3-D5-1F-30-01-00-00:00-DB-12-34-56-78-90-A0:7{}",
                t.before, t.after
            );
            let parsed = replay::parse_request(&full).unwrap();
            assert_eq!(parsed.srv, s.srv);
            assert_eq!(parsed.counter, 7);
        }
    }
}
