//! Data feeds: `data.csv(file)` and `data.json(file)`. The host reads each file once, when the
//! scenario loads, from the scenario's own folder (a path that leads outside it is refused);
//! every user's state then gets the same rows, shared and read-only, and a row becomes a Lua
//! table only when a script asks for it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mlua::{AnyUserData, Lua, LuaSerdeExt, Table, UserData, UserDataMethods, Value};
use rand::RngExt;

use crate::files;

/// The feeds of one scenario, by the file they came from.
#[derive(Debug)]
pub struct Feeds {
    dir: PathBuf,
    loaded: Mutex<HashMap<PathBuf, Arc<Feed>>>,
    /// Set once the scenario has loaded: files read then are all there is.
    sealed: std::sync::atomic::AtomicBool,
}

/// The rows of one file.
#[derive(Debug)]
pub struct Feed {
    name: String,
    rows: Rows,
}

#[derive(Debug)]
enum Rows {
    /// A header line, then rows of as many fields. The fields are kept end to end in one
    /// string, with where each ends (field `k` of row `r` is number `r * columns + k`): about the
    /// file's own size, where a `String` per field would take 10 to 80 times it.
    Csv {
        columns: Vec<String>,
        rows: usize,
        text: String,
        ends: Vec<u32>,
    },
    /// The items of a JSON array.
    Json(Vec<serde_json::Value>),
}

#[derive(Clone, Copy)]
enum Kind {
    Csv,
    Json,
}

impl Feeds {
    /// Feeds of files beside `scenario`.
    pub fn beside(scenario: &Path) -> Self {
        let dir = match scenario.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Self {
            dir,
            loaded: Mutex::new(HashMap::new()),
            sealed: Default::default(),
        }
    }

    /// The scenario has loaded: no other file is read from now on.
    pub fn seal(&self) {
        self.sealed.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self, file: &str, kind: Kind) -> Result<Arc<Feed>, String> {
        let outside = || format!("{file:?} is outside the scenario's folder: feeds are read from there only");
        let relative = Path::new(file);
        if relative.is_absolute() || relative.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(outside());
        }
        let dir = self
            .dir
            .canonicalize()
            .map_err(|e| format!("cannot read the scenario's folder {}: {e}", self.dir.display()))?;
        let path = dir
            .join(file)
            .canonicalize()
            .map_err(|e| format!("cannot read {file:?} beside the scenario: {e}"))?;
        // (A symbolic link may still lead out.)
        if !path.starts_with(&dir) {
            return Err(outside());
        }
        let mut loaded = self.loaded.lock().map_err(|_| "feeds are unavailable".to_string())?;
        if let Some(feed) = loaded.get(&path) {
            return Ok(feed.clone());
        }
        if self.sealed.load(std::sync::atomic::Ordering::Relaxed) {
            // Reading (and parsing) a file is the host's work, outside any script limit: it is
            // done once, while the scenario loads.
            return Err(format!(
                "{file:?} was not read while the scenario loaded: feeds are read then only (call data.csv or data.json at the top of the file, outside the hooks)"
            ));
        }
        let cap = match kind {
            Kind::Csv => files::CSV_FEED_MAX,
            Kind::Json => files::JSON_FEED_MAX,
        };
        let text = files::read(&path, &format!("{file:?}"), cap).map_err(|e| e.to_string())?;
        let rows = match kind {
            Kind::Csv => csv_rows(&text).map_err(|e| format!("{file}: {e}"))?,
            Kind::Json => json_rows(&text).map_err(|e| format!("{file}: {e}"))?,
        };
        let feed = Arc::new(Feed {
            name: file.to_string(),
            rows,
        });
        loaded.insert(path, feed.clone());
        Ok(feed)
    }
}

fn csv_rows(bytes: &[u8]) -> Result<Rows, String> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(bytes);
    let columns: Vec<String> = reader
        .headers()
        .map_err(|e| format!("bad CSV header: {e}"))?
        .iter()
        .map(str::to_string)
        .collect();
    let (mut rows, mut text, mut ends) = (0, String::new(), Vec::new());
    let mut record = csv::StringRecord::new();
    // The reader refuses a row with more or fewer fields than the header.
    while reader
        .read_record(&mut record)
        .map_err(|e| format!("row {}: {e}", rows + 1))?
    {
        for field in &record {
            text.push_str(field);
            // The file is capped well under 4 GiB, so every offset fits.
            ends.push(u32::try_from(text.len()).map_err(|_| "too large".to_string())?);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err("no rows under the header".into());
    }
    text.shrink_to_fit();
    ends.shrink_to_fit();
    Ok(Rows::Csv {
        columns,
        rows,
        text,
        ends,
    })
}

fn json_rows(text: &[u8]) -> Result<Rows, String> {
    match serde_json::from_slice::<serde_json::Value>(text).map_err(|e| format!("not valid JSON: {e}"))? {
        serde_json::Value::Array(items) if !items.is_empty() => Ok(Rows::Json(items)),
        serde_json::Value::Array(_) => Err("the array is empty".into()),
        _ => Err("must hold a JSON array (one item per row)".into()),
    }
}

impl Feed {
    fn len(&self) -> usize {
        match &self.rows {
            Rows::Csv { rows, .. } => *rows,
            Rows::Json(items) => items.len(),
        }
    }

    /// Row `i` (1-based) as a Lua value: a table by column name for CSV, the item for JSON.
    fn row(&self, lua: &Lua, i: usize) -> mlua::Result<Value> {
        match &self.rows {
            Rows::Csv {
                columns, text, ends, ..
            } => {
                let t = lua.create_table_with_capacity(0, columns.len())?;
                let first = (i - 1) * columns.len();
                let mut start = first.checked_sub(1).map_or(0, |k| ends[k] as usize);
                for (column, end) in columns.iter().zip(&ends[first..first + columns.len()]) {
                    let end = *end as usize;
                    t.raw_set(column.as_str(), &text[start..end])?;
                    start = end;
                }
                Ok(Value::Table(t))
            }
            Rows::Json(items) => {
                let options = mlua::serde::SerializeOptions::new()
                    .serialize_none_to_null(false)
                    .serialize_unit_to_null(false);
                lua.to_value_with(&items[i - 1], options)
            }
        }
    }
}

/// A feed in a Lua state.
struct FeedRef(Arc<Feed>);

impl UserData for FeedRef {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("len", |_, this, ()| Ok(this.0.len()));
        methods.add_method("row", |lua, this, i: i64| {
            let n = this.0.len();
            if i < 1 || i as usize > n {
                return Err(mlua::Error::runtime(format!(
                    "{}: row({i}) is out of range (rows 1 to {n})",
                    this.0.name
                )));
            }
            this.0.row(lua, i as usize)
        });
        methods.add_method("random", |lua, this, ()| {
            this.0.row(lua, rand::rng().random_range(1..=this.0.len()))
        });
        // The same row for a user every time, and distinct rows for distinct users while there
        // are rows enough (user n gets row n, wrapping around).
        methods.add_method("for_user", |lua, this, user: Table| {
            let id: i64 = user.raw_get("id")?;
            let n = this.0.len() as i64;
            this.0.row(lua, ((id - 1).rem_euclid(n) + 1) as usize)
        });
    }
}

/// The `data` global: `data.csv(file)`, `data.json(file)`.
pub fn data_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (name, kind) in [("csv", Kind::Csv), ("json", Kind::Json)] {
        let f = lua.create_function(move |lua, file: String| {
            let feeds = lua
                .app_data_ref::<Arc<Feeds>>()
                .map(|f| f.clone())
                .ok_or_else(|| mlua::Error::runtime("data feeds are not available here"))?;
            let feed = feeds
                .get(&file, kind)
                .map_err(|e| mlua::Error::runtime(format!("data.{name}: {e}")))?;
            lua.create_userdata(FeedRef(feed))
                .map(|ud: AnyUserData| Value::UserData(ud))
        })?;
        t.raw_set(name, f)?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_read_files_beside_the_scenario_only() {
        let dir = std::env::temp_dir().join(format!("stormlight-feeds-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("users.csv"), "name, password\nann,a1\nbob,b2\n").unwrap();
        std::fs::write(dir.join("items.json"), r#"[{"id": 1}, {"id": 2, "tag": null}]"#).unwrap();
        std::fs::write(dir.join("bad.json"), r#"{"id": 1}"#).unwrap();
        let feeds = Feeds::beside(&dir.join("sub").join("..").join("s.lua"));
        let users = feeds.get("users.csv", Kind::Csv).unwrap();
        assert_eq!(users.len(), 2);
        assert!(
            Arc::ptr_eq(&users, &feeds.get("./users.csv", Kind::Csv).unwrap()),
            "read once"
        );
        // Once the scenario has loaded, what it read is there, and nothing else is read.
        feeds.seal();
        assert!(feeds.get("users.csv", Kind::Csv).is_ok());
        let late = feeds.get("items.json", Kind::Json).unwrap_err();
        assert!(late.contains("was not read while the scenario loaded"), "{late}");
        let feeds = Feeds::beside(&dir.join("s.lua"));
        let lua = Lua::new();
        let row = |feed: &Feed, i: usize| -> Vec<(String, String)> {
            let t = match feed.row(&lua, i).unwrap() {
                Value::Table(t) => t,
                other => panic!("row {i} is {other:?}"),
            };
            let mut pairs: Vec<(String, String)> = t.pairs().map(|p| p.unwrap()).collect();
            pairs.sort();
            pairs
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(row(&users, 1), [pair("name", "ann"), pair("password", "a1")]);
        assert_eq!(row(&users, 2), [pair("name", "bob"), pair("password", "b2")]);
        std::fs::write(dir.join("gaps.csv"), "a,b,c\n,x,\n\u{e9}t\u{e9},,z\n").unwrap();
        let gaps = feeds.get("gaps.csv", Kind::Csv).unwrap();
        assert_eq!(row(&gaps, 1), [pair("a", ""), pair("b", "x"), pair("c", "")]);
        assert_eq!(
            row(&gaps, 2),
            [pair("a", "\u{e9}t\u{e9}"), pair("b", ""), pair("c", "z")]
        );
        std::fs::write(dir.join("short.csv"), "a,b\n1,2\n3\n").unwrap();
        let err = feeds.get("short.csv", Kind::Csv).unwrap_err();
        assert!(err.contains("row 2"), "{err}");
        assert_eq!(feeds.get("items.json", Kind::Json).unwrap().len(), 2);
        let outside = feeds.get("../stormlight-feeds-x/users.csv", Kind::Csv);
        assert!(outside.is_err());
        let err = match feeds.get("/etc/passwd", Kind::Csv) {
            Err(e) => e,
            Ok(_) => panic!("read a file outside the folder"),
        };
        assert!(err.contains("outside the scenario's folder"), "{err}");
        assert!(feeds.get("bad.json", Kind::Json).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
