//! An instance on a thread of its own, and the steady master's wait off the async runtime.
//!
//! At 10 ms adverts a master wakes 100 times a second to send one packet. Through tokio each
//! wake-up goes driver → scheduler → task → `select!` over a dozen branches and back, and
//! measured per advert that was ~40 µs of user time against keepalived's ~11 µs for the same
//! three system calls (docs/benchmarks.md). So while an instance is a steady master (nothing
//! pending but the next advert) its run loop leaves the runtime and waits on an epoll set of
//! its own: the advert timerfd, the advert socket and an eventfd. The control inputs
//! (shutdown, tracking, reload, kill) are polled with a waker that writes that eventfd, so a
//! change reaches the loop as promptly as through tokio. Anything else — a packet, another
//! timer, a VIP change — hands control back to the async loop.
//!
//! Waiting outside the runtime blocks the thread, which is why only [`spawn`], which gives the
//! instance a current-thread runtime and a thread that run nothing else, turns it on;
//! [`crate::run`] on a shared runtime never blocks.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::InstanceError;
use crate::instance::{run_with, InstanceConfig, RunHandles};

/// A running instance on its own thread; see [`spawn`]. Dropping it stops the instance at
/// once without a handover (as `kill -9` would: the VIPs and VMACs stay for the next start to
/// adopt) and waits for the thread to end.
#[derive(Debug)]
pub struct InstanceThread {
    name: String,
    kill: CancellationToken,
    done: Option<oneshot::Receiver<Result<(), InstanceError>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Runs [`crate::run`]'s instance on a new thread named `vrrp` with a current-thread runtime
/// of its own, where a steady master waits without the runtime (see the module doc). The
/// handles work across threads as they are.
pub fn spawn(config: InstanceConfig, handles: RunHandles) -> Result<InstanceThread, InstanceError> {
    let name = config.name.clone();
    let kill = CancellationToken::new();
    let (done_tx, done_rx) = oneshot::channel();
    let killed = kill.clone();
    let instance = name.clone();
    let thread = std::thread::Builder::new()
        .name("vrrp".into())
        .spawn(move || {
            // Built (and dropped) here: a runtime must not be dropped inside another's
            // async context, which is where `spawn` is called from.
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(async {
                    tokio::select! {
                        biased;
                        // Seen here at any await point; the steady loop watches it itself.
                        () = killed.cancelled() => Ok(()),
                        r = run_with(config, handles, Some(killed.clone())) => r,
                    }
                }),
                Err(source) => Err(InstanceError::Thread { instance, source }),
            };
            // The receiver may be gone (the handle was dropped): nothing to report then.
            let _ = done_tx.send(result);
        })
        .map_err(|source| InstanceError::Thread {
            instance: name.clone(),
            source,
        })?;
    Ok(InstanceThread {
        name,
        kill,
        done: Some(done_rx),
        thread: Some(thread),
    })
}

impl InstanceThread {
    /// Waits until the instance returns: after a shutdown's handover, or with a setup error.
    /// Cancel-safe; pending forever once it has returned.
    pub async fn wait(&mut self) -> Result<(), InstanceError> {
        let Some(done) = self.done.as_mut() else {
            return std::future::pending().await;
        };
        let result = done.await;
        self.done = None;
        result.unwrap_or_else(|_| {
            Err(InstanceError::Thread {
                instance: self.name.clone(),
                source: io::Error::other("the instance's thread ended without a result"),
            })
        })
    }
}

impl Drop for InstanceThread {
    fn drop(&mut self) {
        self.kill.cancel();
        if let Some(thread) = self.thread.take() {
            // Bounded: the instance returns at its next await point or steady-loop wake-up,
            // and never waits on this thread. Joining keeps "dropped" meaning "gone", so a
            // successor never shares the VRID with it.
            let _ = thread.join();
        }
    }
}

/// The eventfd the control inputs' waker writes.
struct WakeFd(EventFd);

impl Wake for WakeFd {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Only fails when the counter would overflow, and then a wake-up is pending anyway.
        let _ = self.0.write(1);
    }
}

const WOKEN: u64 = 0;
const TIMER: u64 = 1;
const SOCKET: u64 = 2;

/// What a [`Steady::wait`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// The waker was called: poll the control inputs.
    pub(crate) woken: bool,
    /// The advert timerfd is readable.
    pub(crate) timer: bool,
    /// A receiving socket is readable.
    pub(crate) socket: bool,
}

/// The steady master's epoll set (level-triggered; the fds stay registered with tokio's
/// edge-triggered poller too, which simply sees an already-consumed edge later) and the
/// waker for the control inputs.
pub(crate) struct Steady {
    epoll: Epoll,
    wake: Arc<WakeFd>,
    waker: Waker,
}

impl Steady {
    pub(crate) fn new(timer: BorrowedFd<'_>, sockets: &[BorrowedFd<'_>]) -> io::Result<Steady> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = Arc::new(WakeFd(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?));
        epoll.add(&wake.0, EpollEvent::new(EpollFlags::EPOLLIN, WOKEN))?;
        epoll.add(timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER))?;
        for s in sockets {
            epoll.add(s, EpollEvent::new(EpollFlags::EPOLLIN, SOCKET))?;
        }
        let waker = Waker::from(wake.clone());
        Ok(Steady { epoll, wake, waker })
    }

    /// The waker to poll the control inputs with.
    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Blocks until something is ready or `timeout` (rounded up to whole milliseconds)
    /// passed; all false then. A wake-up is consumed here.
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<Readiness> {
        let ms = timeout
            .as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(timeout.subsec_nanos().div_ceil(1_000_000)));
        let ms = EpollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX));
        let mut events = [EpollEvent::empty(); 4];
        let n = loop {
            match self.epoll.wait(&mut events, ms) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut ready = Readiness::default();
        for ev in &events[..n] {
            match ev.data() {
                WOKEN => {
                    ready.woken = true;
                    match self.wake.0.read() {
                        Ok(_) | Err(Errno::EAGAIN) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                TIMER => ready.timer = true,
                _ => ready.socket = true,
            }
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn wait_reports_wakes_timers_and_sockets_and_times_out() {
        let timer = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let s = Steady::new(timer.as_fd(), &[b.as_fd()]).unwrap();

        let t0 = tokio::time::Instant::now();
        assert_eq!(
            s.wait(Duration::from_millis(20)).unwrap(),
            Readiness::default()
        );
        assert!(
            t0.elapsed() >= Duration::from_millis(20),
            "returned before the timeout"
        );

        // A wake from another thread ends the wait and is consumed by it.
        let waker = s.waker().clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            waker.wake();
        });
        let r = s.wait(Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert!(r.woken && !r.timer && !r.socket, "{r:?}");
        assert_eq!(s.wait(Duration::ZERO).unwrap(), Readiness::default());

        timer.write(1).unwrap();
        a.send(b"x").unwrap();
        let r = s.wait(Duration::from_secs(5)).unwrap();
        assert!(!r.woken && r.timer && r.socket, "{r:?}");
        // Level-triggered: still ready until read.
        let r = s.wait(Duration::ZERO).unwrap();
        assert!(r.timer && r.socket, "{r:?}");
    }
}
