//! The key `message_id` uniqueness is enforced on: uuid1 text with its time fields first.
//!
//! Ceilometer's `message_id` is `str(uuid.uuid1())`: `llllllll-mmmm-1hhh-cccc-nnnnnnnnnnnn`,
//! the low 32 bits of a 60-bit clock first. Those wrap every 429 s, so in text order the ids
//! are random and every insert into a `message_id` index lands on a random page: the index of a
//! day's chunk (431k rows in the cloud) is written all over, and on SQLite that one
//! index was half of a growing store's write time (docs/storage.md, *The message key*).
//! Reordered as `1hhh-mmmm-llllllll-cccc-nnnnnnnnnnnn` (what MySQL's `UUID_TO_BIN(u, 1)` does
//! in binary), the text sorts by the time the sample was made, so inserts land at the end of
//! the index, a few hot pages.
//!
//! [`message_key`] is an involution: it swaps the set `A` of lowercase uuid1 texts with the set
//! `B` of their reordered forms (the two are disjoint: character 5 is a hex digit in `A` and
//! `-` in `B`) and leaves every other string alone. Being a bijection, a unique index on the key
//! admits exactly what a unique index on `message_id` admits: idempotence is unchanged, for
//! every id a publisher may send. The column keeps the id as sent; only the index holds the
//! key, as SQL (`message_key_sql`) the database evaluates, so a plain `INSERT` from any client
//! keeps the index right.

use std::borrow::Cow;

const HEX: &str = "[0-9a-f]";

/// Pattern shape of uuid1 text: (field length, fixed first character) per dash-separated field.
const UUID1: [(usize, Option<char>); 5] =
    [(8, None), (4, None), (4, Some('1')), (4, None), (12, None)];
const KEYED: [(usize, Option<char>); 5] =
    [(4, Some('1')), (4, None), (8, None), (4, None), (12, None)];

fn shaped(s: &[u8], shape: &[(usize, Option<char>); 5]) -> bool {
    if s.len() != 36 {
        return false;
    }
    let mut at = 0;
    for (i, (len, first)) in shape.iter().enumerate() {
        if i > 0 {
            if s[at] != b'-' {
                return false;
            }
            at += 1;
        }
        for (j, &c) in s[at..at + len].iter().enumerate() {
            let ok = match first {
                Some(f) if j == 0 => c == *f as u8,
                _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
            };
            if !ok {
                return false;
            }
        }
        at += len;
    }
    true
}

/// The three leading fields of a shape in the order the other shape has them, as (0-based
/// start, length): uuid1 text to its key, and back. The rest (from byte 18: `-cccc-nnnn...`)
/// stays in place.
const TO_KEY: [(usize, usize); 3] = [(14, 4), (9, 4), (0, 8)];
const FROM_KEY: [(usize, usize); 3] = [(10, 8), (5, 4), (0, 4)];

fn reorder(id: &str, fields: &[(usize, usize); 3]) -> String {
    let f = |i: usize| &id[fields[i].0..fields[i].0 + fields[i].1];
    format!("{}-{}-{}{}", f(0), f(1), f(2), &id[18..])
}

/// The index key of `message_id` (see the module doc); `message_key(message_key(x)) == x`.
pub fn message_key(id: &str) -> Cow<'_, str> {
    let b = id.as_bytes();
    if shaped(b, &UUID1) {
        Cow::Owned(reorder(id, &TO_KEY))
    } else if shaped(b, &KEYED) {
        Cow::Owned(reorder(id, &FROM_KEY))
    } else {
        Cow::Borrowed(id)
    }
}

/// The fields of uuid1 text, time first: time-high (with the version digit), time-mid,
/// time-low, clock sequence, node, as (0-based start, length) in the text.
const KEY_FIELDS: [(usize, usize); 5] = [(14, 4), (9, 4), (0, 8), (19, 4), (24, 12)];

/// A SQLite chunk's stored key of `message_id` (chunks made by schema 6 on): for lowercase
/// uuid1 text, its 16 bytes with the time fields first (what MySQL's `UUID_TO_BIN(u, 1)`
/// gives), so keys sort by the sample's clock and inserts land at the end of the index; any
/// other id is its own key, as text.
///
/// The key is unique exactly when the id is: two uuid1 texts give two different byte strings
/// (the hex of the same 32 digits, reordered the same way), two other ids two different texts,
/// and SQLite never finds a blob equal to a text. [`message_key_blob_sql`] computes the same
/// in SQL, for a client that writes a chunk itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKey<'a> {
    Uuid1([u8; 16]),
    Text(&'a str),
}

impl<'a> StoredKey<'a> {
    pub fn of(id: &'a str) -> StoredKey<'a> {
        let b = id.as_bytes();
        if !shaped(b, &UUID1) {
            return StoredKey::Text(id);
        }
        // Only [0-9a-f] reach here (the shape).
        let hex = |c: u8| if c <= b'9' { c - b'0' } else { c - b'a' + 10 };
        let mut out = [0u8; 16];
        let mut n = 0;
        for &(at, len) in &KEY_FIELDS {
            for pair in b[at..at + len].chunks_exact(2) {
                out[n] = (hex(pair[0]) << 4) | hex(pair[1]);
                n += 1;
            }
        }
        StoredKey::Uuid1(out)
    }
}

impl rusqlite::ToSql for StoredKey<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            StoredKey::Uuid1(b) => ValueRef::Blob(b),
            StoredKey::Text(t) => ValueRef::Text(t.as_bytes()),
        }))
    }
}

/// The `message_id` of a SQLite chunk row, in SQL (`p` prefixes the column names, e.g. `s.`):
/// chunks made from schema 6 on keep the id only as its [`StoredKey`] (`message_id` is NULL),
/// which this turns back into the id (lowercase hex in uuid1 order for a blob, the text
/// itself otherwise); older chunks keep `message_id` (and a NULL key).
pub fn message_id_sql(p: &str) -> String {
    let k = format!("{p}message_key");
    let digits: Vec<String> = [(8, 8), (4, 4), (0, 4), (16, 4), (20, 12)]
        .iter()
        .map(|(at, len)| format!("substr(hex({k}), {}, {len})", at + 1))
        .collect();
    format!(
        "COALESCE({p}message_id, CASE typeof({k}) WHEN 'blob' THEN lower({}) ELSE {k} END)",
        digits.join(" || '-' || ")
    )
}

/// [`StoredKey`] of column (or parameter) `col` in SQLite SQL (`unhex` needs SQLite 3.41).
pub fn message_key_blob_sql(col: &str) -> String {
    let digits: Vec<String> = KEY_FIELDS
        .iter()
        .map(|(at, len)| format!("substr({col}, {}, {len})", at + 1))
        .collect();
    format!(
        "(CASE WHEN {col} GLOB '{}' THEN unhex({}) ELSE {col} END)",
        glob(&UUID1),
        digits.join(" || ")
    )
}

/// The shape as a SQLite `GLOB` pattern.
fn glob(shape: &[(usize, Option<char>); 5]) -> String {
    let fields: Vec<String> = shape
        .iter()
        .map(|(len, first)| match first {
            Some(f) => format!("{f}{}", HEX.repeat(len - 1)),
            None => HEX.repeat(*len),
        })
        .collect();
    fields.join("-")
}

/// The shape as an anchored regular expression (MariaDB's PCRE, MySQL's ICU).
fn regexp(shape: &[(usize, Option<char>); 5]) -> String {
    let fields: Vec<String> = shape
        .iter()
        .map(|(len, first)| match first {
            Some(f) => format!("{f}{HEX}{{{}}}", len - 1),
            None => format!("{HEX}{{{len}}}"),
        })
        .collect();
    format!("^{}$", fields.join("-"))
}

/// [`message_key`] of column `col` in SQL, for an index expression or a generated column.
/// Only built-in deterministic functions are used, so any client can write the table; the
/// pattern tests are case-sensitive like the Rust side (SQLite's `GLOB`; MariaDB's `REGEXP` on
/// a column of binary collation, which `sample`'s text columns have).
pub fn message_key_sql(col: &str, dialect: Dialect) -> String {
    let (a, b) = match dialect {
        Dialect::Sqlite => (
            format!("{col} GLOB '{}'", glob(&UUID1)),
            format!("{col} GLOB '{}'", glob(&KEYED)),
        ),
        Dialect::Mysql => (
            format!("{col} REGEXP '{}'", regexp(&UUID1)),
            format!("{col} REGEXP '{}'", regexp(&KEYED)),
        ),
    };
    let cat = |parts: &[String]| match dialect {
        Dialect::Sqlite => parts.join(" || "),
        Dialect::Mysql => format!("CONCAT({})", parts.join(", ")),
    };
    // `reorder` in SQL (substr counts from 1).
    let reorder = |fields: &[(usize, usize); 3]| {
        let sub = |i: usize| format!("substr({col}, {}, {})", fields[i].0 + 1, fields[i].1);
        cat(&[
            sub(0),
            "'-'".to_string(),
            sub(1),
            "'-'".to_string(),
            sub(2),
            format!("substr({col}, 19)"),
        ])
    };
    let (swap, unswap) = (reorder(&TO_KEY), reorder(&FROM_KEY));
    format!("(CASE WHEN {a} THEN {swap} WHEN {b} THEN {unswap} ELSE {col} END)")
}

/// Which SQL [`message_key_sql`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Mysql,
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "5f2b1c3a-9e41-11ef-8a3c-0242ac120002";

    #[test]
    fn uuid1_text_is_keyed_time_first_and_back() {
        let k = message_key(U);
        assert_eq!(k, "11ef-9e41-5f2b1c3a-8a3c-0242ac120002");
        assert_eq!(message_key(&k), U);
    }

    #[test]
    fn other_strings_are_their_own_key() {
        for s in [
            "",
            "id-1",
            "5F2B1C3A-9E41-11EF-8A3C-0242AC120002", // upper case: not what Python writes
            "5f2b1c3a-9e41-41ef-8a3c-0242ac120002", // uuid4
            "5f2b1c3a-9e41-11ef-8a3c-0242ac12000",  // short
            "11ef-9e41-5f2b1c3a-8a3c-0242ac12000x",
        ] {
            assert_eq!(message_key(s), s);
        }
    }

    #[test]
    fn a_uuid1_is_stored_as_its_bytes_time_first() {
        let k = StoredKey::of(U);
        let want = [
            0x11, 0xef, 0x9e, 0x41, 0x5f, 0x2b, 0x1c, 0x3a, 0x8a, 0x3c, 0x02, 0x42, 0xac, 0x12,
            0x00, 0x02,
        ];
        assert_eq!(k, StoredKey::Uuid1(want));
        for other in [
            "id-1",
            "5F2B1C3A-9E41-11EF-8A3C-0242AC120002",
            "11ef-9e41-5f2b1c3a-8a3c-0242ac120002",
        ] {
            assert_eq!(StoredKey::of(other), StoredKey::Text(other));
        }
        // Later clock, greater key, although the later id's text sorts first.
        let early = StoredKey::of("ffffff00-9e41-11ef-8a3c-0242ac120002");
        let late = StoredKey::of("00000100-9e42-11ef-8a3c-0242ac120002");
        match (early, late) {
            (StoredKey::Uuid1(e), StoredKey::Uuid1(l)) => assert!(e < l),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_sort_by_the_uuid_clock() {
        // Two ids 429.5 s apart: the later one's low clock bits wrapped, so its text sorts first.
        let early = "ffffff00-9e41-11ef-8a3c-0242ac120002";
        let late = "00000100-9e42-11ef-8a3c-0242ac120002";
        assert!(late < early);
        assert!(message_key(early) < message_key(late));
    }

    #[test]
    fn the_mysql_patterns_are_the_shapes() {
        let sql = message_key_sql("m", Dialect::Mysql);
        assert!(sql.contains(
            "m REGEXP '^[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$'"
        ));
        assert!(sql.contains(
            "m REGEXP '^1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{12}$'"
        ));
        assert!(sql.contains("CONCAT(substr(m, 15, 4), '-', substr(m, 10, 4)"));
    }

    proptest::proptest! {
        #[test]
        fn the_key_is_an_involution(s in "[0-9a-f1-]{30,40}|[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{12}|\\PC{0,40}") {
            let k = message_key(&s);
            proptest::prop_assert_eq!(message_key(&k), s.as_str());
        }

        #[test]
        fn sqlite_computes_the_same_stored_key(s in "[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-fA-F]{8}-[0-9a-f]{4}-[14][0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f1-]{34,38}|\\PC{0,40}") {
            let conn = rusqlite::Connection::open_in_memory().unwrap();
            let sql = format!("SELECT {0} IS ?2 AND typeof({0}) = typeof(?2)", message_key_blob_sql("?1"));
            let same: bool = conn.query_row(&sql, rusqlite::params![s, StoredKey::of(&s)], |r| r.get(0)).unwrap();
            proptest::prop_assert!(same, "{:?}", StoredKey::of(&s));
        }

        #[test]
        fn sqlite_gives_back_the_id_from_its_stored_key(s in "[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-fA-F]{8}-[0-9a-f]{4}-[14][0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|\\PC{0,40}") {
            let conn = rusqlite::Connection::open_in_memory().unwrap();
            conn.execute_batch("CREATE TABLE t (message_id TEXT, message_key BLOB)").unwrap();
            conn.execute("INSERT INTO t VALUES (NULL, ?1)", [StoredKey::of(&s)]).unwrap();
            let back: String = conn
                .query_row(&format!("SELECT {} FROM t", message_id_sql("")), [], |r| r.get(0))
                .unwrap();
            proptest::prop_assert_eq!(back, s);
        }

        #[test]
        fn stored_keys_are_distinct_exactly_when_ids_are(a in "[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|\\PC{0,40}", b in "[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|\\PC{0,40}") {
            proptest::prop_assert_eq!(StoredKey::of(&a) == StoredKey::of(&b), a == b);
        }

        #[test]
        fn sqlite_computes_the_same_key(s in "[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}|1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f1-]{34,38}|\\PC{0,40}") {
            let conn = rusqlite::Connection::open_in_memory().unwrap();
            let sql = format!("SELECT {}", message_key_sql("?1", Dialect::Sqlite));
            let k: String = conn.query_row(&sql, [&s], |r| r.get(0)).unwrap();
            proptest::prop_assert_eq!(k, message_key(&s).into_owned());
        }
    }
}
