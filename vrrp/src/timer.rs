//! The advert and Master_Down timers: `CLOCK_MONOTONIC` timerfds that the runtime's poller
//! watches like a socket.
//!
//! At 10 ms adverts a master fires its advert timer 100 times a second. A tokio `Sleep`
//! re-armed after each advert made the runtime wake its own driver every time (the new
//! deadline is earlier than anything else pending, so registering it writes the driver's
//! eventfd and costs an extra `epoll_wait`). The kernel's periodic timer re-arms itself: a
//! steady master does one `epoll_wait`, one `read` of the expiry count and one `sendmsg` per
//! advert.
//!
//! tokio also rounds every deadline up to its millisecond wheel and sleeps in whole
//! milliseconds, which made a backup's Master_Down fire about 1 ms late (up to 3 ms): a
//! timerfd fires within the kernel's timer slack (50 µs), as keepalived's do.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// The timerfd in the form tokio's reactor takes (`AsyncFd` wants `AsRawFd`).
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One timer, periodic or one-shot; see the module doc.
pub(crate) struct KernelTimer {
    fd: AsyncFd<Fd>,
    /// When the kernel timer fires next and its period (None: once), while armed.
    armed: Option<(Instant, Option<Duration>)>,
}

impl KernelTimer {
    pub(crate) fn new() -> io::Result<KernelTimer> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        // SAFETY: `Fd` owns the timerfd: it stays open and unchanged until the `Fd` is
        // dropped, which happens only when the `AsyncFd` owning it is dropped.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(Fd(fd), tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(KernelTimer { fd, armed: None })
    }

    /// Makes the timer fire at `at` and then every `period` (or only once for `None`), or
    /// never (`at` None). Costs no system call when the kernel timer already does exactly
    /// that, which is the case for a master re-arming after each advert from the time it was
    /// due.
    pub(crate) fn sync(&mut self, at: Option<Instant>, period: Option<Duration>) -> io::Result<()> {
        let want = at.map(|at| (at, period));
        if want == self.armed {
            return Ok(());
        }
        match want {
            None => self.fd.get_ref().0.unset().map_err(io::Error::from)?,
            Some((at, period)) => {
                // A zero initial expiry would disarm the timer: fire "now" as 1 ns.
                let first = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                let expiration = match period {
                    Some(p) => {
                        Expiration::IntervalDelayed(TimeSpec::from(first), TimeSpec::from(p))
                    }
                    None => Expiration::OneShot(TimeSpec::from(first)),
                };
                self.fd
                    .get_ref()
                    .0
                    .set(expiration, TimerSetTimeFlags::empty())
                    .map_err(io::Error::from)?;
            }
        }
        self.armed = want;
        Ok(())
    }

    /// Waits for the next expiry. Pending forever while disarmed. When the runtime was late
    /// by more than a period (several expiries at once), they count as one.
    pub(crate) async fn fired(&mut self) -> io::Result<()> {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let expiries = read_expiries(&self.fd.get_ref().0)?;
            // Reading reset the count, and an empty read means the readiness was spurious:
            // either way the fd is quiet until the next expiry, whose edge the reactor sees
            // afresh. Clearing now saves a read that would only say EAGAIN.
            guard.clear_ready();
            if let Some(n) = expiries {
                self.expired(n);
                return Ok(());
            }
        }
    }

    /// The expiry test without the runtime, for a loop that waits on [`Self::fd`] itself:
    /// true if the timer fired since the last read (several expiries count as one).
    pub(crate) fn try_fired(&mut self) -> io::Result<bool> {
        let expiries = read_expiries(&self.fd.get_ref().0)?;
        if let Some(n) = expiries {
            self.expired(n);
        }
        Ok(expiries.is_some())
    }

    /// The timerfd, readable when the timer fired.
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().0.as_fd()
    }

    /// Moves the next expiry on past `n` periods, or marks a one-shot timer spent.
    fn expired(&mut self, n: u64) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        match self.armed {
            Some((next, Some(period))) => {
                self.armed = Some((next + period.saturating_mul(n), Some(period)));
            }
            _ => self.armed = None,
        }
    }
}

/// Reads (and so resets) the expiry count; None while the timer has not fired.
fn read_expiries(fd: &TimerFd) -> io::Result<Option<u64>> {
    let mut count = [0u8; 8];
    loop {
        match nix::unistd::read(fd.as_fd(), &mut count) {
            Ok(8) => return Ok(Some(u64::from_ne_bytes(count))),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "timerfd read returned {n} bytes, expected 8"
                )))
            }
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_periodically_and_sync_is_free_when_unchanged() {
        let mut t = KernelTimer::new().unwrap();
        let period = Duration::from_millis(20);
        let start = Instant::now();
        let first = start + Duration::from_millis(10);
        t.sync(Some(first), Some(period)).unwrap();
        t.fired().await.unwrap();
        let after_first = Instant::now();
        assert!(
            after_first >= first,
            "fired {:?} early",
            first - after_first
        );
        // The kernel timer already fires at first + period: the same request changes nothing.
        assert_eq!(t.armed, Some((first + period, Some(period))));
        t.sync(Some(first + period), Some(period)).unwrap();
        t.fired().await.unwrap();
        assert!(Instant::now() >= first + period);
        assert_eq!(t.armed, Some((first + 2 * period, Some(period))));
    }

    #[tokio::test]
    async fn disarmed_never_fires_and_rearming_moves_the_deadline() {
        let mut t = KernelTimer::new().unwrap();
        let period = Duration::from_millis(10);
        t.sync(Some(Instant::now() + period), Some(period)).unwrap();
        t.sync(None, Some(period)).unwrap();
        let r = tokio::time::timeout(Duration::from_millis(50), t.fired()).await;
        assert!(r.is_err(), "a disarmed timer fired");

        // A deadline in the past fires at once.
        let start = Instant::now();
        t.sync(Some(start - Duration::from_millis(5)), Some(period))
            .unwrap();
        tokio::time::timeout(Duration::from_millis(500), t.fired())
            .await
            .expect("a past deadline did not fire")
            .unwrap();

        // Moved later: does not fire at the old time.
        let later = Instant::now() + Duration::from_millis(60);
        t.sync(
            Some(Instant::now() + Duration::from_millis(5)),
            Some(period),
        )
        .unwrap();
        t.sync(Some(later), Some(period)).unwrap();
        t.fired().await.unwrap();
        assert!(Instant::now() >= later, "fired before the moved deadline");
    }

    #[tokio::test]
    async fn missed_expiries_count_as_one() {
        let mut t = KernelTimer::new().unwrap();
        let period = Duration::from_millis(5);
        let first = Instant::now() + period;
        t.sync(Some(first), Some(period)).unwrap();
        // Block the runtime's thread across several periods.
        std::thread::sleep(Duration::from_millis(30));
        t.fired().await.unwrap();
        let (next, _) = t.armed.unwrap();
        assert!(
            next > first + 4 * period,
            "the missed expiries were not skipped: next {:?} after first",
            next - first
        );
    }

    #[tokio::test]
    async fn try_fired_reads_without_waiting_and_keeps_the_schedule() {
        let mut t = KernelTimer::new().unwrap();
        assert!(!t.try_fired().unwrap(), "a disarmed timer fired");
        let period = Duration::from_millis(10);
        let first = Instant::now() + Duration::from_millis(5);
        t.sync(Some(first), Some(period)).unwrap();
        assert!(!t.try_fired().unwrap(), "fired before its first expiry");
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.try_fired().unwrap());
        let (next, _) = t.armed.unwrap();
        assert!(
            next > Instant::now(),
            "the next expiry is not in the future"
        );
        // The expiries were read: nothing more until the next one.
        assert!(!t.try_fired().unwrap());
        // The kernel timer still fires where `armed` says: sync with it is free and the async
        // wait sees the next expiry.
        t.sync(Some(next), Some(period)).unwrap();
        t.fired().await.unwrap();
        assert!(Instant::now() >= next);
    }

    #[tokio::test]
    async fn one_shot_fires_once_then_is_spent() {
        let mut t = KernelTimer::new().unwrap();
        let at = Instant::now() + Duration::from_millis(5);
        t.sync(Some(at), None).unwrap();
        t.fired().await.unwrap();
        assert!(Instant::now() >= at);
        assert_eq!(t.armed, None, "a one-shot timer stays armed after firing");
        let r = tokio::time::timeout(Duration::from_millis(30), t.fired()).await;
        assert!(r.is_err(), "a one-shot timer fired twice");
    }
}
