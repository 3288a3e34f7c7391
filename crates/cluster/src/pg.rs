//! The lease, its fencing and the schema in PostgreSQL.
//!
//! # Tables
//!
//! - `dsplane_meta (key, value)`: `schema_version`, the version of these tables.
//! - `dsplane_lease`: one row (`id = 1`): the active node's name, its epoch, and when its lease
//!   expires, by the server's clock. Taking the lease and renewing it update this row.
//! - `dsplane_fence`: one row (`id = 1`): the epoch again, updated only by a takeover, in the
//!   same transaction. Writes lock this row, not the lease's, so that the active's renewals never
//!   wait behind its own writes (a slow commit waiting for a standby would otherwise hold its
//!   renewal up until the lease ran out).
//! - `dsplane_frames`: the replicated log's frames not yet delivered ([`crate::log`]), each
//!   with the epoch that wrote it, its peer, lane and level, and its bytes on the wire.
//!
//! # The lease
//!
//! Taken with one `UPDATE` that succeeds only if the row has expired (or was never held), and
//! raises the epoch; renewed with one that succeeds only while the row still has the node's
//! epoch. Expiry is by the server's clock (`clock_timestamp()`), so the nodes' clocks need not
//! agree with each other.
//!
//! # Fencing
//!
//! Every write of the active runs through [`Db::fenced`]: a transaction that first reads the
//! fence row `FOR SHARE` and checks its epoch. The share lock conflicts with a takeover's
//! `UPDATE` of that row, so of a write and a takeover one waits for the other: a write that
//! got the lock first commits before the takeover can (and the new active, which loads after
//! it, sees it), and every write after the takeover sees the new epoch and is refused with
//! [`Fenced`], before it changes anything.
//!
//! # Timeouts
//!
//! [`Db::set_timeouts`] bounds every statement and lock wait of a connection, so that a server
//! that hangs (or a lock held too long) ends in an error the caller can count as a failure
//! ([`crate::lease::Lease::on_failed`]) rather than a wait without end.

use std::fmt;

use postgres::error::SqlState;

use crate::lease::LeaseMs;
use postgres::{Client, NoTls, Transaction};

/// The version of the tables this build writes. A database with a newer one is refused (a newer
/// dsplane made it); an older one is upgraded by `init` when that is written.
pub const SCHEMA_VERSION: u32 = 1;

/// How long a connection attempt, or unacknowledged data on an open connection
/// (`TCP_USER_TIMEOUT`), may wait for an unreachable server, unless the connection string says
/// otherwise (`connect_timeout`, `tcp_user_timeout`).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What went wrong with PostgreSQL, worded for an operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No connection could be made (down, unreachable, refused).
    #[error("PostgreSQL at {target} cannot be reached: {}", describe(.source))]
    Unreachable {
        /// Host and port, from the connection string (never the password).
        target: String,
        /// The driver's error.
        source: postgres::Error,
    },
    /// The server refused this user or password, or the database does not exist.
    #[error("PostgreSQL at {target} refused the connection: {message}; check [cluster] postgres (user, password, dbname)")]
    Refused {
        /// Host and port.
        target: String,
        /// The server's message.
        message: String,
    },
    /// The connection string does not parse.
    #[error("[cluster] postgres is not a valid libpq connection string: {0}")]
    BadConnectionString(postgres::Error),
    /// The tables were made by a newer dsplane.
    #[error("the dsplane tables in PostgreSQL are at schema version {found}, newer than this dsplane's {SCHEMA_VERSION}; run the newer dsplane, or restore a database it did not upgrade")]
    SchemaTooNew {
        /// The version found.
        found: u32,
    },
    /// The tables are not there (`dsplane cluster init` creates them).
    #[error("the dsplane tables are not in this PostgreSQL database; run `dsplane cluster init` (or start a node, which creates them)")]
    NoSchema,
    /// The schema version row does not parse.
    #[error("dsplane_meta.schema_version is {0:?}, not a number; the table was changed by hand")]
    BadSchemaVersion(String),
    /// A query failed.
    #[error("PostgreSQL: {}", describe(.0))]
    Query(#[from] postgres::Error),
    /// A row does not have the columns this build expects (the tables were changed by hand, or
    /// by another version).
    #[error("{table}: {why}; the dsplane tables were changed outside dsplane")]
    BadRow {
        /// The table.
        table: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A frame's id does not fit the table's column (ids are positive and below 2^63).
    #[error("frame id {0} is out of range (1 to 2^63 - 1)")]
    IdOutOfRange(u64),
}

/// A fenced write found the lease at a newer epoch: the node must stop ([`crate::lease::Role::Fenced`]). Nothing of the write was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fenced: this node holds epoch {held}, the lease is at epoch {current}")]
pub struct Fenced {
    /// The epoch the node holds.
    pub held: u64,
    /// The epoch in the lease row.
    pub current: u64,
}

/// A fenced write's outcome.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another node holds the lease: stop.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// PostgreSQL failed: nothing may be taken as written; try again.
    #[error(transparent)]
    Db(#[from] ClusterError),
}

impl From<postgres::Error> for WriteError {
    fn from(e: postgres::Error) -> WriteError {
        WriteError::Db(ClusterError::Query(e))
    }
}

/// Who holds the lease, as the row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The node's name.
    pub node: String,
    /// Its epoch.
    pub epoch: u64,
    /// Whether its lease has expired, by the server's clock.
    pub expired: bool,
}

/// One connection to PostgreSQL.
pub struct Db {
    client: Client,
    target: String,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("target", &self.target).finish()
    }
}

/// The driver's error with what it wraps: the server's message and SQLSTATE, or the I/O error
/// (the driver's own `Display` is only "db error" or "error connecting to server").
pub fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(inner) => format!("{e}: {inner}"),
        None => e.to_string(),
    }
}

/// "host:port" of a connection string, for messages (never its password).
fn target_of(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// A server's refusal (authentication, a missing role or database), as opposed to a network
/// failure.
fn is_refusal(e: &postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return false;
    };
    [
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INVALID_CATALOG_NAME,
        SqlState::INSUFFICIENT_PRIVILEGE,
    ]
    .contains(code)
}

/// Column `i` of a row of `table`, or [`ClusterError::BadRow`].
pub(crate) fn col<'a, T: postgres::types::FromSql<'a>>(
    row: &'a postgres::Row,
    table: &'static str,
    i: usize,
) -> Result<T, ClusterError> {
    row.try_get(i).map_err(|e| ClusterError::BadRow {
        table,
        why: format!("column {i}: {e}"),
    })
}

/// An epoch as stored (CHECKed non-negative).
fn epoch_of(v: i64) -> Result<u64, ClusterError> {
    u64::try_from(v).map_err(|_| ClusterError::BadRow {
        table: "dsplane_lease",
        why: format!("epoch {v} is negative"),
    })
}

fn int8(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Db {
    /// Connects with a libpq connection string (`host=… port=… dbname=… user=…`).
    ///
    /// # Errors
    ///
    /// [`ClusterError::BadConnectionString`], [`ClusterError::Refused`] (wrong credentials, no
    /// such database) or [`ClusterError::Unreachable`].
    pub fn connect(conninfo: &str) -> Result<Db, ClusterError> {
        let mut config: postgres::Config = conninfo
            .parse()
            .map_err(ClusterError::BadConnectionString)?;
        // A host that drops packets (a cut network) must end in an error, not a wait of
        // minutes: the server's statement timeout cannot end a wait for a server it cannot
        // reach. The connection string's own values win.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true);
        let target = target_of(&config);
        match config.connect(NoTls) {
            Ok(client) => Ok(Db { client, target }),
            Err(e) if is_refusal(&e) => Err(ClusterError::Refused {
                target,
                message: e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string()),
            }),
            Err(source) => Err(ClusterError::Unreachable { target, source }),
        }
    }

    /// Creates the tables if they are not there, in one transaction; a database at a newer
    /// version is refused. Safe to run on every start and from several nodes at once (the
    /// first to take the advisory lock creates, the others find them made).
    ///
    /// # Errors
    ///
    /// [`ClusterError::SchemaTooNew`], or a failed query.
    pub fn init(&mut self) -> Result<u32, ClusterError> {
        let mut tx = self.client.transaction()?;
        // One creator at a time (a constant key: "dsplane" in ASCII).
        tx.execute("SELECT pg_advisory_xact_lock(28274424362921573)", &[])?;
        // A newer dsplane's tables are refused before anything here touches them.
        if has_meta(&mut tx)? {
            if let Some(found) = read_version(&mut tx)?.filter(|&v| v > SCHEMA_VERSION) {
                return Err(ClusterError::SchemaTooNew { found });
            }
        }
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS dsplane_meta (
                 key   text PRIMARY KEY,
                 value text NOT NULL
             );
             CREATE TABLE IF NOT EXISTS dsplane_lease (
                 id         integer PRIMARY KEY CHECK (id = 1),
                 node       text,
                 epoch      bigint NOT NULL CHECK (epoch >= 0),
                 expires_at timestamptz NOT NULL
             );
             INSERT INTO dsplane_lease (id, node, epoch, expires_at)
                 VALUES (1, NULL, 0, '-infinity') ON CONFLICT (id) DO NOTHING;
             CREATE TABLE IF NOT EXISTS dsplane_fence (
                 id    integer PRIMARY KEY CHECK (id = 1),
                 epoch bigint NOT NULL CHECK (epoch >= 0)
             );
             INSERT INTO dsplane_fence (id, epoch) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
             CREATE TABLE IF NOT EXISTS dsplane_frames (
                 id          bigint PRIMARY KEY CHECK (id > 0),
                 epoch       bigint NOT NULL,
                 peer_kind   smallint NOT NULL,
                 peer_id     bigint NOT NULL,
                 lane        smallint NOT NULL,
                 level       smallint NOT NULL,
                 enqueued_ns bigint NOT NULL,
                 frame       bytea NOT NULL
             );
             CREATE INDEX IF NOT EXISTS dsplane_frames_lane
                 ON dsplane_frames (peer_kind, peer_id, lane, id);",
        )?;
        let found = read_version(&mut tx)?;
        let version = match found {
            Some(v) if v > SCHEMA_VERSION => return Err(ClusterError::SchemaTooNew { found: v }),
            Some(v) => v,
            None => {
                tx.execute(
                    "INSERT INTO dsplane_meta (key, value) VALUES ('schema_version', $1)",
                    &[&SCHEMA_VERSION.to_string()],
                )?;
                SCHEMA_VERSION
            }
        };
        tx.commit()?;
        Ok(version)
    }

    /// Checks, without changing anything, that the tables are there at a version this build
    /// reads (`check-config`).
    ///
    /// # Errors
    ///
    /// [`ClusterError::NoSchema`], [`ClusterError::SchemaTooNew`], or a failed query.
    pub fn check(&mut self) -> Result<u32, ClusterError> {
        let mut tx = self.client.transaction()?;
        if !has_meta(&mut tx)? {
            return Err(ClusterError::NoSchema);
        }
        match read_version(&mut tx)? {
            None => Err(ClusterError::NoSchema),
            Some(v) if v > SCHEMA_VERSION => Err(ClusterError::SchemaTooNew { found: v }),
            Some(v) => Ok(v),
        }
    }

    /// Takes the lease for `node` if it has expired: its new epoch, or `None` while another
    /// node's lease runs (this node's own too: an earlier run of it may still be alive).
    ///
    /// # Errors
    ///
    /// A failed query.
    ///
    /// The fence row takes the new epoch in the same transaction: that update waits for the old
    /// active's writes in flight, and refuses its later ones.
    pub fn try_acquire(&mut self, node: &str, lease: LeaseMs) -> Result<Option<u64>, ClusterError> {
        let mut tx = self.client.transaction()?;
        let row = tx.query_opt(
            "UPDATE dsplane_lease
                 SET node = $1, epoch = epoch + 1,
                     expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond'
               WHERE id = 1 AND expires_at < clock_timestamp()
           RETURNING epoch",
            &[&node, &int8(lease.get())],
        )?;
        let Some(row) = row else {
            return Ok(None);
        };
        let epoch: i64 = col(&row, "dsplane_lease", 0)?;
        tx.execute(
            "UPDATE dsplane_fence SET epoch = $1 WHERE id = 1",
            &[&epoch],
        )?;
        tx.commit()?;
        Ok(Some(epoch_of(epoch)?))
    }

    /// Renews `node`'s lease of `epoch`: `false` when the row has another epoch (a takeover;
    /// the node is fenced). A lease that expired but was not taken over is renewed: nobody
    /// else acted meanwhile.
    ///
    /// # Errors
    ///
    /// A failed query.
    pub fn renew(&mut self, node: &str, epoch: u64, lease: LeaseMs) -> Result<bool, ClusterError> {
        let n = self.client.execute(
            "UPDATE dsplane_lease
                 SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
               WHERE id = 1 AND node = $1 AND epoch = $2",
            &[&node, &int8(epoch), &int8(lease.get())],
        )?;
        Ok(n == 1)
    }

    /// Gives up `node`'s lease of `epoch` (a clean stop), so that a standby takes over without
    /// waiting for it to expire. `false` if the row has moved on.
    ///
    /// # Errors
    ///
    /// A failed query.
    pub fn release(&mut self, node: &str, epoch: u64) -> Result<bool, ClusterError> {
        let n = self.client.execute(
            "UPDATE dsplane_lease SET expires_at = '-infinity'
               WHERE id = 1 AND node = $1 AND epoch = $2",
            &[&node, &int8(epoch)],
        )?;
        Ok(n == 1)
    }

    /// Records `layout` (how the log's lanes are laid out: the scheduling and levels of the
    /// nodes) for the cluster, or checks it against the one recorded: `Some(recorded)` when that
    /// differs and the log still holds frames laid out by it. An empty log takes the new layout.
    ///
    /// # Errors
    ///
    /// A failed query.
    pub fn claim_layout(&mut self, layout: &str) -> Result<Option<String>, ClusterError> {
        let mut tx = self.client.transaction()?;
        let row = tx.query_opt(
            "SELECT value FROM dsplane_meta WHERE key = 'lane_layout' FOR UPDATE",
            &[],
        )?;
        let recorded: Option<String> = match &row {
            Some(r) => Some(col(r, "dsplane_meta", 0)?),
            None => None,
        };
        if recorded.as_deref() == Some(layout) {
            return Ok(None);
        }
        if recorded.is_some() {
            let left = tx.query_one("SELECT EXISTS (SELECT 1 FROM dsplane_frames)", &[])?;
            if col::<bool>(&left, "dsplane_frames", 0)? {
                return Ok(recorded);
            }
        }
        tx.execute(
            "INSERT INTO dsplane_meta (key, value) VALUES ('lane_layout', $1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&layout],
        )?;
        tx.commit()?;
        Ok(None)
    }

    /// Who holds the lease (a standby names the active in its NACK).
    ///
    /// # Errors
    ///
    /// A failed query.
    pub fn holder(&mut self) -> Result<Option<Holder>, ClusterError> {
        let row = self.client.query_one(
            "SELECT node, epoch, expires_at < clock_timestamp() FROM dsplane_lease WHERE id = 1",
            &[],
        )?;
        let node: Option<String> = col(&row, "dsplane_lease", 0)?;
        let Some(node) = node else {
            return Ok(None);
        };
        Ok(Some(Holder {
            node,
            epoch: epoch_of(col(&row, "dsplane_lease", 1)?)?,
            expired: col(&row, "dsplane_lease", 2)?,
        }))
    }

    /// Runs `write` in a transaction fenced by `epoch` (see the module documentation): it
    /// commits only if the lease row still has that epoch, and the row stays locked against a
    /// takeover until it has.
    ///
    /// # Errors
    ///
    /// [`WriteError::Fenced`] (nothing was written), or a failed query (nothing may be taken
    /// as written).
    pub fn fenced<T>(
        &mut self,
        epoch: u64,
        write: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, WriteError> {
        let mut tx = self.client.transaction()?;
        let row = tx.query_one(
            "SELECT epoch FROM dsplane_fence WHERE id = 1 FOR SHARE",
            &[],
        )?;
        let current = epoch_of(col(&row, "dsplane_fence", 0)?)?;
        if current != epoch {
            // Dropping the transaction rolls it back.
            return Err(Fenced {
                held: epoch,
                current,
            }
            .into());
        }
        let out = write(&mut tx)?;
        // The statement timeout does not bound this: PostgreSQL disarms it before it commits, so
        // a commit waits for a synchronous standby as long as that takes. Nothing here may send a
        // cancel request either: a cancelled wait leaves the transaction committed on this host
        // only, and PostgreSQL answers the COMMIT as a success, with a warning.
        tx.commit()?;
        Ok(out)
    }

    /// Bounds every statement, every lock wait, and every pause inside a transaction of this
    /// connection to `ms` (0: no bound), so that a hung server or a long-held lock ends in an
    /// error. A lease connection uses a third of the lease: a renewal that takes longer has lost
    /// its use. The last bound is for a node stopped (SIGSTOP, a pause) inside a fenced write:
    /// its transaction holds the fence row's share lock, which a takeover must wait for, and
    /// PostgreSQL ends such a session once it has been idle in its transaction for `ms`.
    ///
    /// # Errors
    ///
    /// A failed query.
    pub fn set_timeouts(&mut self, ms: u64) -> Result<(), ClusterError> {
        self.client.batch_execute(&format!(
            "SET statement_timeout = {ms}; SET lock_timeout = {ms}; \
             SET idle_in_transaction_session_timeout = {ms}"
        ))?;
        Ok(())
    }

    /// The connection, for queries this module does not wrap (tests, `cluster init`'s report).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }
}

fn has_meta(tx: &mut Transaction<'_>) -> Result<bool, ClusterError> {
    let row = tx.query_one("SELECT to_regclass('dsplane_meta') IS NOT NULL", &[])?;
    col(&row, "dsplane_meta", 0)
}

fn read_version(tx: &mut Transaction<'_>) -> Result<Option<u32>, ClusterError> {
    let row = tx.query_opt(
        "SELECT value FROM dsplane_meta WHERE key = 'schema_version'",
        &[],
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    let value: String = col(&row, "dsplane_meta", 0)?;
    value
        .parse::<u32>()
        .map(Some)
        .map_err(|_| ClusterError::BadSchemaVersion(value))
}
