//! A controllable clock: real time by default, frozen or advanced by tests so
//! that expiry and timer behaviour can be exercised without sleeping.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Shared handle to the simulated clock. Clones see the same time.
///
/// It drives `proxy_get_current_time_nanoseconds`, WASI `clock_time_get`
/// (realtime and monotonic), the `request.time` property and timers.
#[derive(Clone, Debug)]
pub struct SimClock {
    inner: Arc<Mutex<ClockState>>,
}

#[derive(Debug)]
struct ClockState {
    /// Real instant the clock was created; monotonic time counts from here.
    origin: Instant,
    /// Wall time at `origin`, in ns since the epoch.
    origin_wall_ns: u64,
    /// When frozen, the elapsed real time at which it stopped.
    frozen_at: Option<Duration>,
    /// Time added by `advance`.
    offset: Duration,
}

impl Default for SimClock {
    fn default() -> Self {
        Self::new()
    }
}

impl SimClock {
    /// A clock that follows real time until frozen or advanced.
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            inner: Arc::new(Mutex::new(ClockState {
                origin: Instant::now(),
                origin_wall_ns: wall.as_nanos() as u64,
                frozen_at: None,
                offset: Duration::ZERO,
            })),
        }
    }

    /// A clock frozen at the given wall time (ns since the Unix epoch).
    pub fn frozen_at(wall_ns: u64) -> Self {
        let clock = Self::new();
        {
            let mut s = clock.lock();
            s.origin_wall_ns = wall_ns;
            s.frozen_at = Some(Duration::ZERO);
        }
        clock
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn elapsed(s: &ClockState) -> Duration {
        s.frozen_at.unwrap_or_else(|| s.origin.elapsed()) + s.offset
    }

    /// Stops the clock where it is; only `advance` moves it afterwards.
    pub fn freeze(&self) {
        let mut s = self.lock();
        if s.frozen_at.is_none() {
            s.frozen_at = Some(s.origin.elapsed());
        }
    }

    /// Lets the clock follow real time again from where it stands.
    pub fn unfreeze(&self) {
        let mut s = self.lock();
        if let Some(at) = s.frozen_at.take() {
            let now = s.origin.elapsed();
            s.offset = (s.offset + at).saturating_sub(now);
        }
    }

    /// Moves both wall and monotonic time forward.
    pub fn advance(&self, by: Duration) {
        self.lock().offset += by;
    }

    /// Wall-clock time in nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> u64 {
        let s = self.lock();
        s.origin_wall_ns + Self::elapsed(&s).as_nanos() as u64
    }

    /// Monotonic time in nanoseconds since the clock was created.
    pub fn monotonic_ns(&self) -> u64 {
        Self::elapsed(&self.lock()).as_nanos() as u64
    }

    /// Wall-clock time as a `SystemTime`.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_clock_moves_only_when_advanced() {
        let c = SimClock::frozen_at(1_000);
        assert_eq!(c.now_ns(), 1_000);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(c.now_ns(), 1_000);
        c.advance(Duration::from_secs(1));
        assert_eq!(c.now_ns(), 1_000_001_000);
        assert_eq!(c.monotonic_ns(), 1_000_000_000);
    }
}
