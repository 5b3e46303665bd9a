//! A shard's sync thread: it runs the chat log's fdatasync ([`SyncJob`]) so that the shard
//! thread goes on serving media and chat while the disk works, and wakes the shard through its
//! mailbox eventfd when a job is done. One job at a time (the channel holds one); the shard
//! collects the result in its next loop turn and only then releases "sent" and deliveries.
//! The thread is a blocked system call most of its life; it never touches shard state.

use crate::chat::log::SyncJob;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;

/// A finished job, its result and how long it took in microseconds.
pub type Finished = (SyncJob, io::Result<()>, u64);

/// See the module documentation.
pub struct Syncer {
    jobs: Option<SyncSender<SyncJob>>,
    done: Receiver<Finished>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the sync thread of shard `shard`; `waker` is the shard's eventfd (duplicated
    /// here, so it lives as long as the thread needs it).
    pub fn spawn(shard: u16, waker: RawFd) -> io::Result<Self> {
        // SAFETY: dup of a live descriptor; the result is a new descriptor we own, or -1.
        let fd = unsafe { libc::fcntl(waker, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is fresh and ours.
        let waker = unsafe { OwnedFd::from_raw_fd(fd) };
        let (jobs, job_rx) = mpsc::sync_channel::<SyncJob>(1);
        let (done_tx, done) = mpsc::sync_channel::<Finished>(1);
        let thread = std::thread::Builder::new()
            .name(format!("sync-{shard}"))
            .spawn(move || {
                // Spawned from the pinned shard thread: take the whole process's CPUs instead,
                // so that the fdatasync never queues behind its own shard.
                let _ = super::sys::pin_to_cpus(&super::sys::process_cpus());
                for job in job_rx {
                    let started = std::time::Instant::now();
                    let r = job.run();
                    let us = started.elapsed().as_micros() as u64;
                    if done_tx.send((job, r, us)).is_err() {
                        return;
                    }
                    let one: u64 = 1;
                    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. EAGAIN (a
                    // full counter) means a wake-up is pending already.
                    unsafe { libc::write(waker.as_raw_fd(), (&one as *const u64).cast(), 8) };
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    /// Hands `job` to the thread. The caller keeps one job in flight at a time; a second one
    /// is an error, as is a thread that died.
    pub fn submit(&self, job: SyncJob) -> io::Result<()> {
        match self.jobs.as_ref().map(|j| j.try_send(job)) {
            Some(Ok(())) => Ok(()),
            Some(Err(TrySendError::Full(_))) => Err(io::Error::other("a sync job is in flight")),
            _ => Err(io::Error::other("the sync thread is gone")),
        }
    }

    /// The finished job, if any, without waiting.
    pub fn try_finished(&self) -> io::Result<Option<Finished>> {
        match self.done.try_recv() {
            Ok(f) => Ok(Some(f)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(io::Error::other("the sync thread is gone")),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the job channel ends the thread once its current job is done.
        self.jobs.take();
        while self.done.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
