//! Signals as synchronous events, shared by clupserver and cstlb: block
//! them before any thread starts, then take them one at a time in the main
//! thread with sigwait. No handlers run asynchronously.

/// Block SIGTERM, SIGINT and SIGHUP in this thread and every thread started
/// after it; [`wait_signal`] then receives them synchronously.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Wait for one of the blocked signals; returns its number.
pub fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait on a set built by block_signals.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Send `sig` to `pid`; false if the process does not exist.
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(pid, sig) == 0 }
}
