//! Stop signals, received synchronously by the main thread (no async signal handler).

use std::io;
use std::mem::zeroed;

/// The set of signals that stop the relay.
pub struct StopSignals(libc::sigset_t);

/// Blocks SIGTERM and SIGINT in the calling thread (and every thread it spawns afterwards).
pub fn block_stop_signals() -> io::Result<StopSignals> {
    // SAFETY: sigset_t is initialised by sigemptyset before use; pthread_sigmask reads it.
    unsafe {
        let mut set: libc::sigset_t = zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(StopSignals(set))
    }
}

/// Waits until a stop signal arrives or `give_up` returns true (checked every 100 ms).
/// Returns a description of what happened.
pub fn wait_for_stop_signal(signals: &StopSignals, mut give_up: impl FnMut() -> bool) -> String {
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    loop {
        // SAFETY: the set and timeout are live for the call; a null siginfo is allowed.
        let sig = unsafe { libc::sigtimedwait(&signals.0, std::ptr::null_mut(), &timeout) };
        match sig {
            libc::SIGTERM => return "SIGTERM".into(),
            libc::SIGINT => return "SIGINT".into(),
            _ if give_up() => return "a shard ended".into(),
            _ => {}
        }
    }
}
