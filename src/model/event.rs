//! Events: the record of each state change clupserver makes or sees (a
//! database marked Fault, a restart, a failover's begin and end, ...), the
//! ring of recent ones with their sequence numbers, and how an event is
//! handed to an `event_command` hook (environment variables, never the
//! command line).
//!
//! Plain data only: the hook runner and the file the ring is kept in are
//! the monitor's ([`crate::model`] does no I/O beyond parsing).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// What happened. The names (`as_str`) are what hooks and `GET /events`
/// see; they never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A database was marked Fault in the meta.
    Fault,
    /// A database whose host is up was started again in place.
    Restart,
    /// A failover task starts (old primary known, new one chosen).
    FailoverBegin,
    /// A failover task ended (reason: completed or failed).
    FailoverEnd,
    /// A standby was promoted (failover or switch).
    Promote,
    /// An old primary was fenced (stopped, or killed when hung).
    Fence,
    /// A switchover task ended (reason: completed or why it failed).
    Switch,
    /// A repair task ended (reason: completed or why it failed).
    Repair,
    /// The cluster was frozen (`clupadm froze`).
    Froze,
    /// The cluster was unfrozen (`clupadm unfroze`).
    Unfroze,
    /// A backend was added to or removed from a cstlb.
    CstlbChange,
    /// This clupserver's role changed (meta_store = etcd).
    LeaderChange,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::Fault,
        EventKind::Restart,
        EventKind::FailoverBegin,
        EventKind::FailoverEnd,
        EventKind::Promote,
        EventKind::Fence,
        EventKind::Switch,
        EventKind::Repair,
        EventKind::Froze,
        EventKind::Unfroze,
        EventKind::CstlbChange,
        EventKind::LeaderChange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Fault => "fault",
            EventKind::Restart => "restart",
            EventKind::FailoverBegin => "failover_begin",
            EventKind::FailoverEnd => "failover_end",
            EventKind::Promote => "promote",
            EventKind::Fence => "fence",
            EventKind::Switch => "switch",
            EventKind::Repair => "repair",
            EventKind::Froze => "froze",
            EventKind::Unfroze => "unfroze",
            EventKind::CstlbChange => "cstlb_change",
            EventKind::LeaderChange => "leader_change",
        }
    }
}

/// An event before it has a sequence number and a time: what the place
/// that saw it knows. Empty strings and `None` mean "not about that".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub cluster: String,
    pub db_id: Option<u32>,
    pub host: String,
    /// The old primary as `host:port` (failover, switch, promote).
    pub old_primary: String,
    /// The new primary as `host:port`.
    pub new_primary: String,
    pub reason: String,
}

impl NewEvent {
    pub fn new(kind: EventKind, cluster: &str) -> NewEvent {
        NewEvent {
            kind,
            cluster: cluster.to_string(),
            db_id: None,
            host: String::new(),
            old_primary: String::new(),
            new_primary: String::new(),
            reason: String::new(),
        }
    }

    pub fn db(mut self, id: u32, host: &str) -> NewEvent {
        self.db_id = Some(id);
        self.host = host.to_string();
        self
    }

    pub fn host(mut self, host: &str) -> NewEvent {
        self.host = host.to_string();
        self
    }

    pub fn primaries(mut self, old: &str, new: &str) -> NewEvent {
        self.old_primary = old.to_string();
        self.new_primary = new.to_string();
        self
    }

    /// The reason, on one line (a decision's reason may hold several).
    pub fn reason(mut self, reason: &str) -> NewEvent {
        self.reason = one_line(reason);
        self
    }
}

/// One recorded event, as `GET /events` serves it and `data/events.json`
/// keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
    pub event: String,
    pub cluster: String,
    pub db_id: Option<u32>,
    pub host: String,
    pub old_primary: String,
    pub new_primary: String,
    pub reason: String,
}

impl Event {
    /// The environment of the hook run for this event: every variable is
    /// set, empty when the event is not about it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CLUP_EVENT", self.event.clone()),
            ("CLUP_EVENT_SEQ", self.seq.to_string()),
            ("CLUP_CLUSTER", self.cluster.clone()),
            (
                "CLUP_DB_ID",
                self.db_id.map(|i| i.to_string()).unwrap_or_default(),
            ),
            ("CLUP_HOST", self.host.clone()),
            ("CLUP_OLD_PRIMARY", self.old_primary.clone()),
            ("CLUP_NEW_PRIMARY", self.new_primary.clone()),
            ("CLUP_REASON", self.reason.clone()),
            ("CLUP_TIME", self.time.clone()),
        ]
    }

    /// `clupadm events`' line: `seq time event cluster db_id host
    /// old_primary new_primary reason`, separated by single spaces, `-` for
    /// an empty field; the reason is last and may hold spaces.
    pub fn line(&self) -> String {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.replace(char::is_whitespace, "_")
            }
        };
        format!(
            "{} {} {} {} {} {} {} {} {}",
            self.seq,
            self.time,
            self.event,
            dash(&self.cluster),
            self.db_id
                .map_or_else(|| "-".to_string(), |i| i.to_string()),
            dash(&self.host),
            dash(&self.old_primary),
            dash(&self.new_primary),
            if self.reason.is_empty() {
                "-"
            } else {
                &self.reason
            }
        )
    }
}

/// How many events the ring keeps (and `data/events.json` holds).
pub const RING_SIZE: usize = 1000;

/// The recent events, oldest first, and the next sequence number. The
/// sequence goes on across restarts when the ring is saved and loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// The sequence number the next event gets (the first is 1).
    pub next_seq: u64,
    pub events: VecDeque<Event>,
}

impl Ring {
    /// Record `e` at `epoch_secs`; the oldest event goes when the ring is full.
    pub fn push(&mut self, e: NewEvent, epoch_secs: u64) -> Event {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        let ev = Event {
            seq,
            time: utc_time(epoch_secs),
            event: e.kind.as_str().to_string(),
            cluster: e.cluster,
            db_id: e.db_id,
            host: e.host,
            old_primary: e.old_primary,
            new_primary: e.new_primary,
            reason: e.reason,
        };
        self.events.push_back(ev.clone());
        while self.events.len() > RING_SIZE {
            self.events.pop_front();
        }
        ev
    }

    /// The events with a sequence number above `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }

    /// The ring as `data/events.json` keeps it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }

    /// A saved ring; the next number is past every event it holds, even
    /// if the file says less.
    pub fn from_json(text: &str) -> Result<Ring, String> {
        let mut r: Ring = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let last = r.events.iter().map(|e| e.seq).max().unwrap_or(0);
        r.next_seq = r.next_seq.max(last + 1);
        while r.events.len() > RING_SIZE {
            r.events.pop_front();
        }
        Ok(r)
    }
}

/// Text on one line: line breaks and other control characters become spaces.
pub fn one_line(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for an epoch second (UTC, proleptic Gregorian).
pub fn utc_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failover_begin() -> NewEvent {
        NewEvent::new(EventKind::FailoverBegin, "cluster01")
            .db(1, "10.213.0.11")
            .primaries("10.213.0.11:5432", "10.213.0.12:5432")
            .reason("primary database(10.213.0.11:5432) is down\nswitch to new host")
    }

    #[test]
    fn an_event_maps_to_every_hook_variable() {
        let mut r = Ring::default();
        let ev = r.push(failover_begin(), 1_733_468_578);
        let env: std::collections::BTreeMap<_, _> = ev.env().into_iter().collect();
        assert_eq!(env["CLUP_EVENT"], "failover_begin");
        assert_eq!(env["CLUP_EVENT_SEQ"], "1");
        assert_eq!(env["CLUP_CLUSTER"], "cluster01");
        assert_eq!(env["CLUP_DB_ID"], "1");
        assert_eq!(env["CLUP_HOST"], "10.213.0.11");
        assert_eq!(env["CLUP_OLD_PRIMARY"], "10.213.0.11:5432");
        assert_eq!(env["CLUP_NEW_PRIMARY"], "10.213.0.12:5432");
        assert_eq!(
            env["CLUP_REASON"],
            "primary database(10.213.0.11:5432) is down switch to new host"
        );
        assert_eq!(env["CLUP_TIME"], "2024-12-06T07:02:58Z");
        assert_eq!(env.len(), 9);
        // An event about no database leaves those variables set but empty.
        let ev = r.push(NewEvent::new(EventKind::Froze, "cluster01"), 0);
        let env: std::collections::BTreeMap<_, _> = ev.env().into_iter().collect();
        assert_eq!(env["CLUP_DB_ID"], "");
        assert_eq!(env["CLUP_OLD_PRIMARY"], "");
        assert_eq!(env["CLUP_TIME"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn utc_time_of_known_dates() {
        assert_eq!(utc_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_time(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(utc_time(1_709_251_199), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn the_ring_numbers_keeps_the_last_and_filters_since() {
        let mut r = Ring::default();
        for i in 0..(RING_SIZE as u64 + 5) {
            r.push(NewEvent::new(EventKind::Restart, "c").db(1, "h"), i);
        }
        assert_eq!(r.events.len(), RING_SIZE);
        assert_eq!(r.events.front().unwrap().seq, 6);
        assert_eq!(r.events.back().unwrap().seq, RING_SIZE as u64 + 5);
        let got: Vec<u64> = r
            .since(RING_SIZE as u64 + 2)
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            got,
            [
                RING_SIZE as u64 + 3,
                RING_SIZE as u64 + 4,
                RING_SIZE as u64 + 5
            ]
        );
        assert_eq!(r.since(0).len(), RING_SIZE);
        assert!(r.since(RING_SIZE as u64 + 5).is_empty());
    }

    #[test]
    fn a_saved_ring_goes_on_with_the_next_number() {
        let mut r = Ring::default();
        r.push(failover_begin(), 10);
        r.push(NewEvent::new(EventKind::Promote, "cluster01"), 11);
        let mut back = Ring::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.push(NewEvent::new(EventKind::Fence, "c"), 12).seq, 3);
        // A file whose next_seq lags its events cannot make numbers repeat.
        let text = r.to_json().replace("\"next_seq\":3", "\"next_seq\":1");
        assert_eq!(Ring::from_json(&text).unwrap().next_seq, 3);
        assert!(Ring::from_json("{").is_err());
    }

    #[test]
    fn the_line_layout_is_fixed() {
        let mut r = Ring::default();
        let ev = r.push(failover_begin(), 1_733_468_578);
        assert_eq!(
            ev.line(),
            "1 2024-12-06T07:02:58Z failover_begin cluster01 1 10.213.0.11 10.213.0.11:5432 10.213.0.12:5432 primary database(10.213.0.11:5432) is down switch to new host"
        );
        let ev = r.push(NewEvent::new(EventKind::LeaderChange, ""), 0);
        assert_eq!(
            ev.line(),
            "2 1970-01-01T00:00:00Z leader_change - - - - - -"
        );
        let names: std::collections::BTreeSet<_> =
            EventKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), EventKind::ALL.len());
    }
}
