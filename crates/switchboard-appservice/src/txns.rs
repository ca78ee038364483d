//! Which transactions were already handled, so a transaction the homeserver sends again (it did
//! not see the answer) is acknowledged without handling its events twice — also after the
//! service restarts.

use std::{
    collections::{HashSet, VecDeque},
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::Error;

/// Transaction IDs kept; homeservers retry the newest one, and their IDs only grow.
const KEEP: usize = 1_000;

/// A store of handled transaction IDs. [`FileTxnStore`] is the default; a bridge with its own
/// database can implement this over it.
pub trait TxnStore: Send + Sync + 'static {
    fn seen(&self, txn_id: &str) -> bool;
    /// Records a handled transaction durably before it is acknowledged.
    fn record(&self, txn_id: &str) -> Result<(), Error>;
}

/// Handled transaction IDs in a file, one per line, appended and synced before each
/// acknowledgement; rewritten to the newest [`KEEP`] when it grows long.
pub struct FileTxnStore {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    order: VecDeque<String>,
    ids: HashSet<String>,
    lines: usize,
}

impl FileTxnStore {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let io = |context: &str, source| Error::Io {
            context: format!("{context} {}", path.display()),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("cannot create the directory of", e))?;
        }
        let mut order = VecDeque::new();
        let mut lines = 0;
        if path.exists() {
            let file = File::open(path).map_err(|e| io("cannot read", e))?;
            for line in BufReader::new(file).lines() {
                let line = line.map_err(|e| io("cannot read", e))?;
                if !line.is_empty() {
                    order.push_back(line);
                    lines += 1;
                }
            }
        }
        while order.len() > KEEP {
            order.pop_front();
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io("cannot open", e))?;
        let ids = order.iter().cloned().collect();
        Ok(Self {
            path: path.to_owned(),
            state: Mutex::new(State {
                file,
                order,
                ids,
                lines,
            }),
        })
    }

    fn compact(&self, state: &mut State) -> Result<(), Error> {
        let io = |source| Error::Io {
            context: format!("cannot rewrite {}", self.path.display()),
            source,
        };
        let temporary = self.path.with_extension("tmp");
        let mut text = String::new();
        for id in &state.order {
            text.push_str(id);
            text.push('\n');
        }
        // The new file's own handle goes on being written after the rename (its position is at
        // the end), so there is no window where records would go to the replaced file.
        let mut file = File::create(&temporary).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temporary, &self.path).map_err(io)?;
        state.file = file;
        state.lines = state.order.len();
        Ok(())
    }
}

impl TxnStore for FileTxnStore {
    fn seen(&self, txn_id: &str) -> bool {
        self.state.lock().is_ok_and(|s| s.ids.contains(txn_id))
    }

    fn record(&self, txn_id: &str) -> Result<(), Error> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| Error::Setup("transaction store poisoned".to_owned()))?;
        // A line break in an ID would split the record; IDs from real homeservers have none.
        if txn_id.contains(['\n', '\r']) {
            return Err(Error::Setup(format!(
                "transaction ID {txn_id:?} contains a line break"
            )));
        }
        let line = format!("{txn_id}\n");
        state
            .file
            .write_all(line.as_bytes())
            .and_then(|()| state.file.sync_data())
            .map_err(|source| Error::Io {
                context: format!("cannot write {}", self.path.display()),
                source,
            })?;
        state.lines += 1;
        state.ids.insert(txn_id.to_owned());
        state.order.push_back(txn_id.to_owned());
        while state.order.len() > KEEP {
            if let Some(old) = state.order.pop_front() {
                state.ids.remove(&old);
            }
        }
        if state.lines > 10 * KEEP
            && let Err(e) = self.compact(&mut state)
        {
            // The record itself is safe in the old file; compaction is tried again next time.
            tracing::warn!(error = %e, "cannot compact the transaction record");
        }
        Ok(())
    }
}

/// Keeps handled transactions in memory only (tests, services that de-duplicate elsewhere).
#[derive(Default)]
pub struct MemoryTxnStore(Mutex<HashSet<String>>);

impl TxnStore for MemoryTxnStore {
    fn seen(&self, txn_id: &str) -> bool {
        self.0.lock().is_ok_and(|s| s.contains(txn_id))
    }

    fn record(&self, txn_id: &str) -> Result<(), Error> {
        if let Ok(mut seen) = self.0.lock() {
            seen.insert(txn_id.to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_transactions_survive_a_restart_and_old_ones_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/txns");
        let store = FileTxnStore::open(&path).expect("open");
        assert!(!store.seen("1"));
        store.record("1").expect("record");
        store.record("2").expect("record");
        assert!(store.seen("1") && store.seen("2"));
        drop(store);

        let store = FileTxnStore::open(&path).expect("reopen");
        assert!(store.seen("1") && store.seen("2"), "remembered across restarts");
        assert!(!store.seen("3"));
        for i in 3..(11 * KEEP + 3) {
            store.record(&i.to_string()).expect("record");
        }
        assert!(!store.seen("1"), "only the newest are kept");
        assert!(store.seen(&(11 * KEEP + 2).to_string()));
        drop(store);
        let lines = std::fs::read_to_string(&path).expect("read").lines().count();
        assert!(lines <= 10 * KEEP, "the file was compacted: {lines} lines");
        let store = FileTxnStore::open(&path).expect("reopen");
        assert!(store.seen(&(11 * KEEP + 2).to_string()));
    }
}
