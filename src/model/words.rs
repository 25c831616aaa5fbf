//! The manual's log lines, word for word (typos included: "steaming",
//! "commpleted"), because 1.x sites grep their logs for them. Every line
//! the manual shows is built here and nowhere else; `tests/compat.rs`
//! checks these functions against the manual's example blocks. Lines of
//! our own are free to say more, elsewhere. Pure: no I/O.

use super::meta::Db;

// ------------------------------------------------------- probing (§3.2)

pub fn find_failed(addr: &str) -> String {
    format!("Find database({addr}) failed, repair it ....")
}

pub fn host_ok_restart(host: &str, addr: &str) -> String {
    format!("Host({host}) is ok, only database({addr}) failed, restart database ....")
}

pub fn host_not_ok(host: &str, addr: &str) -> String {
    format!("Host({host}) is not ok, switch database({addr})...")
}

// ------------------------------------ a standby's failover (§3.2.2)

/// The prefix of a standby failover's lines.
pub fn standby_pre(addr: &str) -> String {
    format!("Failover database({addr})")
}

/// `host`: where the read VIP is once the standby is out.
pub fn standby_switch_to(pre: &str, host: &str) -> String {
    format!("{pre}: switch to host({host}).")
}

pub fn cstlb_remove_begin(pre: &str, backend: &str) -> String {
    format!("{pre}: begin remove bad host({backend}) from cstlb ...")
}

pub fn cstlb_remove_done(pre: &str, backend: &str) -> String {
    format!("{pre}: remove bad host({backend}) from cstlb finished.")
}

pub fn save_node_state_begin(pre: &str) -> String {
    format!("{pre}: save node state to meta server...")
}

pub fn save_node_state_done(pre: &str) -> String {
    format!("{pre}: save node state to meta server completed.")
}

/// The last line of a standby's failover, with the manual's typo.
pub fn standby_all_done(pre: &str) -> String {
    format!("{pre}: all commpleted.")
}

// ------------------------------------- the primary's failover (§3.2.3)

/// The prefix of a primary failover's lines.
pub fn primary_pre(addr: &str) -> String {
    format!("Failover primary database({addr})")
}

/// `addr`: the old primary.
pub fn delete_write_vip_begin(addr: &str, vip: &str) -> String {
    format!("Switch primary database({addr}): begin delete write vip({vip}) ...")
}

pub fn delete_write_vip_done(addr: &str, vip: &str) -> String {
    format!("Switch primary database({addr}): delete write vip({vip}) completed.")
}

pub fn switch_new_host_begin(pre: &str, host: &str) -> String {
    format!("{pre}: switch to new host({host})...")
}

pub fn switch_new_host_done(pre: &str, host: &str) -> String {
    format!("{pre}: switch to new host({host}) completed.")
}

pub fn repoint_all_begin(pre: &str, host: &str) -> String {
    format!("{pre}: change all standby database upper level primary database to host({host})...")
}

pub fn repoint_all_done(pre: &str, host: &str) -> String {
    format!(
        "{pre}: change all standby database upper level primary database to host({host}) completed."
    )
}

pub fn promote_begin(pre: &str, host: &str) -> String {
    format!("{pre}: Promote standby database({host}) to primary...")
}

pub fn promote_done(pre: &str, host: &str) -> String {
    format!("{pre}: Promote standby database({host}) to primary completed.")
}

// ------------------------------------------------------ repair (§3.2.2)

/// The prefix of a repair's first lines.
pub fn repair_pre(cluster: &str, id: u32) -> String {
    format!("Repair(cluster={cluster}, dbid={id})")
}

/// The prefix of a repair's lines once the node is known.
pub fn repair_host_pre(cluster: &str, host: &str) -> String {
    format!("Repair(cluster={cluster}, host={host})")
}

pub fn repair_lock(pre: &str) -> String {
    format!("{pre}: begin get cluster lock...")
}

pub fn repair_begin(pre: &str) -> String {
    format!("{pre}: begin...")
}

pub fn repair_find_primary(pre: &str) -> String {
    format!("{pre}: find primary database ...")
}

pub fn repair_primary_is(pre: &str, db: &Db) -> String {
    format!("{pre}: primary database: {}", py_db(db))
}

pub fn repair_find_fault(pre: &str) -> String {
    format!("{pre}: find fault database ...")
}

/// The manual's line has no cluster in its prefix.
pub fn repair_fault_is(db: &Db) -> String {
    format!("Repair: fault database: {}", py_db(db))
}

pub fn repair_check_streaming(hp: &str) -> String {
    format!("{hp}: checking repair database replication steaming is ok...")
}

pub fn repair_recovery_begin(hp: &str) -> String {
    format!("{hp}: create recovery.conf for this database...")
}

pub fn repair_recovery_done(hp: &str) -> String {
    format!("{hp}: create recovery.conf for this database completed")
}

pub fn repair_to_normal(hp: &str) -> String {
    format!("{hp}: change fault database node to normal ...")
}

pub fn repair_all_done(hp: &str) -> String {
    format!("{hp}: all completed.")
}

/// A db_list entry as 1.x (Python) printed a dict: `{'id': 2, 'state': 1,
/// 'os_user': 'postgres', ...}`, in init.json's key order.
pub fn py_db(d: &Db) -> String {
    format!(
        "{{'id': {}, 'state': {}, 'os_user': {}, 'pgdata': {}, 'is_primary': {}, 'repl_app_name': {}, 'host': {}, 'switch_host': {}, 'port': {}}}",
        d.id,
        d.state,
        py_str(&d.os_user),
        py_str(&d.pgdata),
        d.is_primary,
        py_str(&d.repl_app_name),
        py_str(&d.host),
        py_str(&d.switch_host),
        d.port
    )
}

/// A string as Python's repr shows it (single quotes unless the text has
/// one and no double quote; backslashes and control characters escaped).
fn py_str(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::from(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_of_strings() {
        assert_eq!(py_str("postgres"), "'postgres'");
        assert_eq!(py_str("it's"), "\"it's\"");
        assert_eq!(py_str("a'\"b"), "'a\\'\"b'");
        assert_eq!(py_str("a\\b\n"), "'a\\\\b\\n'");
    }
}
