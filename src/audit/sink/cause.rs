//! Whose fault a failed write is: the entry's, or the connection's and the
//! server's.
//!
//! The audit consumer classifies every error by its cause:
//!
//! - [`Cause::Entry`]: the data of one entry (or of the batch, as a whole)
//!   is refused. The batch is split until the entry that fails is alone;
//!   alone, it becomes a dead letter and everything else is committed, so
//!   one entry can never stall the stream.
//! - [`Cause::Server`]: the connection, the server, its configuration or its
//!   schema is at fault (unreachable, restarting, out of disk, a lock or a
//!   serialization conflict, a missing table, a missing permission). The
//!   entries are fine: the same batch is retried without limit, nothing is
//!   acknowledged and nothing becomes a dead letter.
//!
//! PostgreSQL errors are classified by their SQLSTATE class (the first two
//! characters), SQLite errors by their primary result code; the table is
//! [`cause_of_sqlstate`] and [`cause_of_sqlite`], and `docs/audit.md` has it
//! with the reasons.

use std::ops::Deref as _;

use sea_orm::{DbErr, RuntimeErr};

use crate::error::Error;

/// Whose fault a failed write is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The entry's data: isolate it; alone, it becomes a dead letter.
    Entry,
    /// The connection's or the server's state: retry the batch as it is.
    Server,
}

/// The cause of an error of the sink.
pub fn cause_of(e: &Error) -> Cause {
    match e {
        // A value that does not decode or encode: the row's data.
        Error::Corrupt(_) | Error::InvalidInput(_) => Cause::Entry,
        Error::Database(db) => cause_of_db(db),
        // Redis, the schema version, configuration: never an entry's fault.
        _ => Cause::Server,
    }
}

fn cause_of_db(e: &DbErr) -> Cause {
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(x))
        | DbErr::Exec(RuntimeErr::SqlxError(x))
        | DbErr::Query(RuntimeErr::SqlxError(x)) => cause_of_sqlx(x),
        // A value of a row that does not convert to its Rust type.
        DbErr::TryIntoErr { .. } | DbErr::Type(_) | DbErr::Json(_) => Cause::Entry,
        // Pool exhausted or closed, sea-orm's own failures, anything else.
        _ => Cause::Server,
    }
}

fn cause_of_sqlx(e: &sea_orm::sqlx::Error) -> Cause {
    use sea_orm::sqlx::Error as X;
    match e {
        X::Database(d) => {
            let Some(code) = d.code() else {
                return Cause::Server;
            };
            if d.try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                cause_of_sqlstate(&code)
            } else if d
                .try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
                .is_some()
            {
                code.parse::<i32>().map_or(Cause::Server, cause_of_sqlite)
            } else {
                Cause::Server
            }
        }
        // A value that cannot be sent or read back.
        X::Encode(_) | X::Decode(_) | X::ColumnDecode { .. } => Cause::Entry,
        // I/O, TLS, protocol, the pool, a column or type the schema lacks.
        _ => Cause::Server,
    }
}

/// The cause of a PostgreSQL error, by its SQLSTATE class.
pub fn cause_of_sqlstate(code: &str) -> Cause {
    match code.get(..2).unwrap_or_default() {
        // 09 triggered action exception, 21 cardinality violation, 22 data
        // exception (value too long, invalid text such as a NUL, out of
        // range), 23 integrity constraint violation, 27 triggered data
        // change violation, 44 WITH CHECK OPTION violation, 54 program limit
        // exceeded (an index row over the btree maximum, a value too large),
        // P0 an exception raised by a PL/pgSQL rule for this row.
        "09" | "21" | "22" | "23" | "27" | "44" | "54" | "P0" => Cause::Entry,
        // 08 connection, 25 transaction state (read only, idle timeout),
        // 28 authorization, 3D/3F missing database/schema, 40 rollback
        // (serialization failure, deadlock), 42 syntax or access rule
        // (missing table, missing privilege), 53 insufficient resources,
        // 55 object state (lock not available), 57 operator intervention
        // (shutdown, statement timeout), 58 system error, XX internal
        // error, and every other class: the server's state.
        _ => Cause::Server,
    }
}

/// The cause of a SQLite error, by its primary result code (the low byte of
/// the extended code sqlx reports).
pub fn cause_of_sqlite(code: i32) -> Cause {
    match code & 0xff {
        // TOOBIG, CONSTRAINT (a trigger's RAISE(ABORT) included), MISMATCH,
        // RANGE.
        18 | 19 | 20 | 25 => Cause::Entry,
        // ERROR (no such table, syntax), BUSY, LOCKED, NOMEM, READONLY,
        // IOERR, CORRUPT, FULL, CANTOPEN, SCHEMA, …: the database's state.
        _ => Cause::Server,
    }
}

/// The database's own words for `e`, with its code: what a dead letter's
/// reason quotes.
pub fn refusal(e: &Error) -> String {
    if let Error::Database(
        DbErr::Conn(RuntimeErr::SqlxError(x))
        | DbErr::Exec(RuntimeErr::SqlxError(x))
        | DbErr::Query(RuntimeErr::SqlxError(x)),
    ) = e
        && let sea_orm::sqlx::Error::Database(d) = x.deref()
    {
        let code = d.code().unwrap_or_default();
        let system = if d
            .try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
            .is_some()
        {
            "SQLSTATE"
        } else {
            "SQLite code"
        };
        return format!(
            "the audit database refused it ({system} {code}): {}",
            d.message()
        );
    }
    format!("the audit database refused it: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every SQLSTATE class PostgreSQL defines (Appendix A of its manual),
    /// with the decision the consumer takes.
    const SQLSTATE_CLASSES: &[(&str, Cause)] = &[
        ("00000", Cause::Server), // successful completion (never an error)
        ("01000", Cause::Server), // warning
        ("02000", Cause::Server), // no data
        ("03000", Cause::Server), // SQL statement not yet complete
        ("08006", Cause::Server), // connection failure
        ("09000", Cause::Entry),  // triggered action exception
        ("0A000", Cause::Server), // feature not supported
        ("0B000", Cause::Server), // invalid transaction initiation
        ("0F000", Cause::Server), // locator exception
        ("0L000", Cause::Server), // invalid grantor
        ("0P000", Cause::Server), // invalid role specification
        ("0Z000", Cause::Server), // diagnostics exception
        ("20000", Cause::Server), // case not found
        ("21000", Cause::Entry),  // cardinality violation
        ("22001", Cause::Entry),  // string data right truncation
        ("22003", Cause::Entry),  // numeric value out of range
        ("22021", Cause::Entry),  // character not in repertoire (NUL)
        ("22P05", Cause::Entry),  // untranslatable character (\u0000 in JSON)
        ("23505", Cause::Entry),  // unique violation
        ("23514", Cause::Entry),  // check violation
        ("24000", Cause::Server), // invalid cursor state
        ("25006", Cause::Server), // read only SQL transaction (a standby)
        ("25P03", Cause::Server), // idle in transaction session timeout
        ("26000", Cause::Server), // invalid SQL statement name
        ("27000", Cause::Entry),  // triggered data change violation
        ("28000", Cause::Server), // invalid authorization specification
        ("2B000", Cause::Server), // dependent privilege descriptors exist
        ("2D000", Cause::Server), // invalid transaction termination
        ("2F000", Cause::Server), // SQL routine exception
        ("34000", Cause::Server), // invalid cursor name
        ("38000", Cause::Server), // external routine exception
        ("39000", Cause::Server), // external routine invocation exception
        ("3B000", Cause::Server), // savepoint exception
        ("3D000", Cause::Server), // invalid catalog name
        ("3F000", Cause::Server), // invalid schema name
        ("40001", Cause::Server), // serialization failure
        ("40P01", Cause::Server), // deadlock detected
        ("42501", Cause::Server), // insufficient privilege
        ("42P01", Cause::Server), // undefined table
        ("44000", Cause::Entry),  // WITH CHECK OPTION violation
        ("53100", Cause::Server), // disk full
        ("53200", Cause::Server), // out of memory (lock table too)
        ("53300", Cause::Server), // too many connections
        ("54000", Cause::Entry),  // program limit exceeded (index row size)
        ("54001", Cause::Entry),  // statement too complex
        ("55P03", Cause::Server), // lock not available
        ("57014", Cause::Server), // query canceled (statement timeout)
        ("57P01", Cause::Server), // admin shutdown
        ("58030", Cause::Server), // I/O error
        ("72000", Cause::Server), // snapshot too old
        ("F0000", Cause::Server), // configuration file error
        ("HV000", Cause::Server), // foreign data wrapper error
        ("P0001", Cause::Entry),  // raise exception (a rule for this row)
        ("XX000", Cause::Server), // internal error
        ("XX001", Cause::Server), // data corrupted
    ];

    #[test]
    fn every_sqlstate_class_has_a_decision() {
        for &(code, cause) in SQLSTATE_CLASSES {
            assert_eq!(cause_of_sqlstate(code), cause, "SQLSTATE {code}");
        }
        // Classes PostgreSQL does not define (yet) are the server's.
        assert_eq!(cause_of_sqlstate("ZZ999"), Cause::Server);
        assert_eq!(cause_of_sqlstate(""), Cause::Server);
    }

    #[test]
    fn sqlite_codes_are_classified_by_their_primary_code() {
        let table = [
            (1, Cause::Server),    // SQLITE_ERROR: no such table, syntax
            (5, Cause::Server),    // SQLITE_BUSY
            (6, Cause::Server),    // SQLITE_LOCKED
            (8, Cause::Server),    // SQLITE_READONLY
            (10, Cause::Server),   // SQLITE_IOERR
            (11, Cause::Server),   // SQLITE_CORRUPT
            (13, Cause::Server),   // SQLITE_FULL
            (17, Cause::Server),   // SQLITE_SCHEMA
            (18, Cause::Entry),    // SQLITE_TOOBIG
            (19, Cause::Entry),    // SQLITE_CONSTRAINT
            (20, Cause::Entry),    // SQLITE_MISMATCH
            (25, Cause::Entry),    // SQLITE_RANGE
            (2067, Cause::Entry),  // SQLITE_CONSTRAINT_UNIQUE
            (1811, Cause::Entry),  // SQLITE_CONSTRAINT_TRIGGER (RAISE)
            (275, Cause::Entry),   // SQLITE_CONSTRAINT_CHECK
            (517, Cause::Server),  // SQLITE_BUSY_SNAPSHOT
            (3338, Cause::Server), // SQLITE_IOERR_SHORT_READ
        ];
        for (code, cause) in table {
            assert_eq!(cause_of_sqlite(code), cause, "SQLite code {code}");
        }
    }

    #[test]
    fn errors_outside_the_database_are_classified_too() {
        assert_eq!(cause_of(&Error::Corrupt("row".to_owned())), Cause::Entry);
        assert_eq!(cause_of(&Error::Schema("behind".to_owned())), Cause::Server);
        assert_eq!(
            cause_of(&Error::Database(DbErr::Type("bad".to_owned()))),
            Cause::Entry
        );
        assert_eq!(
            cause_of(&Error::Database(DbErr::ConnectionAcquire(
                sea_orm::error::ConnAcquireErr::Timeout
            ))),
            Cause::Server
        );
        let io = sea_orm::sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert_eq!(
            cause_of(&Error::Database(DbErr::Exec(RuntimeErr::SqlxError(
                std::sync::Arc::new(io)
            )))),
            Cause::Server
        );
    }
}
