//! Client transaction IDs in memory, so a send does not read the database to learn that its
//! transaction is new.
//!
//! The database stays the truth (`event_txns`, written with the event). This only remembers what
//! the process stored itself and, per device, whether the database may know more: transactions
//! from before the start, or ones dropped here to bound memory. Only then is the database asked.

use std::{collections::HashMap, sync::Mutex};

/// Transactions remembered per device before older ones are left to the database.
const PER_DEVICE: usize = 10_000;
/// Transactions remembered in all (about 200 bytes each); beyond, memory starts over and every
/// device learns its history from the database again.
const TOTAL: usize = 200_000;

/// `(room_id, event_type, txn_id)`: the scope the spec gives a transaction ID within a device.
type TxnKey = (String, String, String);

#[derive(Default)]
struct DeviceTxns {
    /// The database may hold transactions of this device that are not in `ids`.
    more_in_database: bool,
    ids: HashMap<TxnKey, String>,
}

/// What memory knows about one transaction.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lookup {
    /// Seen before: the event it created.
    Seen(String),
    /// Certainly new.
    New,
    /// Only the database can tell.
    AskDatabase,
    /// This device's history is unknown; learn it with [`TxnMemory::learn_device`].
    UnknownDevice,
}

pub(super) struct TxnMemory {
    devices: Mutex<Devices>,
    per_device: usize,
    total: usize,
}

#[derive(Default)]
struct Devices {
    by_id: HashMap<(String, String), DeviceTxns>,
    /// Transactions held over all devices.
    held: usize,
}

impl Default for TxnMemory {
    fn default() -> Self {
        Self::with_limits(PER_DEVICE, TOTAL)
    }
}

impl TxnMemory {
    fn with_limits(per_device: usize, total: usize) -> Self {
        Self {
            devices: Mutex::new(Devices::default()),
            per_device,
            total,
        }
    }

    pub(super) fn lookup(&self, user: &str, device: &str, room: &str, kind: &str, txn: &str) -> Lookup {
        let Ok(devices) = self.devices.lock() else {
            return Lookup::AskDatabase;
        };
        let Some(known) = devices.by_id.get(&(user.to_owned(), device.to_owned())) else {
            return Lookup::UnknownDevice;
        };
        match known.ids.get(&(room.to_owned(), kind.to_owned(), txn.to_owned())) {
            Some(event_id) => Lookup::Seen(event_id.clone()),
            None if known.more_in_database => Lookup::AskDatabase,
            None => Lookup::New,
        }
    }

    /// Records whether the database held any transaction of the device when asked. Kept as it
    /// is if another request learnt it first.
    pub(super) fn learn_device(&self, user: &str, device: &str, has_history: bool) {
        if let Ok(mut devices) = self.devices.lock() {
            devices
                .by_id
                .entry((user.to_owned(), device.to_owned()))
                .or_insert_with(|| DeviceTxns {
                    more_in_database: has_history,
                    ids: HashMap::new(),
                });
        }
    }

    /// Remembers a transaction this process stored.
    pub(super) fn record(&self, user: &str, device: &str, room: &str, kind: &str, txn: &str, event_id: &str) {
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        if devices.held >= self.total {
            // Forgetting a device is safe: its next send asks the database about its history.
            *devices = Devices::default();
        }
        let devices = &mut *devices;
        let known = devices
            .by_id
            .entry((user.to_owned(), device.to_owned()))
            // A device first seen here (not through `lookup`) may have older transactions.
            .or_insert_with(|| DeviceTxns {
                more_in_database: true,
                ids: HashMap::new(),
            });
        if known.ids.len() >= self.per_device {
            devices.held -= known.ids.len();
            known.ids.clear();
            known.more_in_database = true;
        }
        let fresh = known
            .ids
            .insert(
                (room.to_owned(), kind.to_owned(), txn.to_owned()),
                event_id.to_owned(),
            )
            .is_none();
        devices.held += usize::from(fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_answers_only_what_it_knows() {
        let memory = TxnMemory::default();
        assert_eq!(
            memory.lookup("@a:x", "D", "!r:x", "m", "1"),
            Lookup::UnknownDevice
        );
        memory.learn_device("@a:x", "D", false);
        assert_eq!(memory.lookup("@a:x", "D", "!r:x", "m", "1"), Lookup::New);
        memory.record("@a:x", "D", "!r:x", "m", "1", "$e");
        assert_eq!(
            memory.lookup("@a:x", "D", "!r:x", "m", "1"),
            Lookup::Seen("$e".into())
        );
        assert_eq!(
            memory.lookup("@a:x", "D", "!r:x", "other", "1"),
            Lookup::New,
            "scoped by type"
        );
        assert_eq!(
            memory.lookup("@a:x", "E", "!r:x", "m", "1"),
            Lookup::UnknownDevice
        );

        memory.learn_device("@b:x", "D", true);
        assert_eq!(memory.lookup("@b:x", "D", "!r:x", "m", "1"), Lookup::AskDatabase);
    }

    #[test]
    fn a_full_memory_starts_over_and_asks_the_database() {
        let memory = TxnMemory::with_limits(100, 250);
        for device in ["A", "B", "C"] {
            memory.learn_device("@a:x", device, false);
            for i in 0..90 {
                memory.record("@a:x", device, "!r:x", "m", &i.to_string(), "$e");
            }
        }
        // 270 > 250: the third device's last records started memory over.
        assert_eq!(
            memory.lookup("@a:x", "A", "!r:x", "m", "1"),
            Lookup::UnknownDevice
        );
        let held = memory.devices.lock().expect("lock").held;
        assert!(held < 250, "{held}");
        assert!(matches!(
            memory.lookup("@a:x", "C", "!r:x", "m", "89"),
            Lookup::Seen(_)
        ));
    }

    #[test]
    fn a_full_device_falls_back_to_the_database() {
        let memory = TxnMemory::default();
        memory.learn_device("@a:x", "D", false);
        for i in 0..=PER_DEVICE {
            memory.record("@a:x", "D", "!r:x", "m", &i.to_string(), "$e");
        }
        assert_eq!(memory.lookup("@a:x", "D", "!r:x", "m", "0"), Lookup::AskDatabase);
        assert_eq!(
            memory.lookup("@a:x", "D", "!r:x", "m", &PER_DEVICE.to_string()),
            Lookup::Seen("$e".into())
        );
    }
}
