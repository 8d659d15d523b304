//! Time for the runtime: the system clock, or a virtual clock tests move by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the runtime reads the time. Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now_ms(&self) -> u64;

    /// True for clocks that only move when told to; the timer driver then does not sleep on
    /// real time and fires timers when [`crate::Runtime::fire_due_timers`] is called.
    fn is_virtual(&self) -> bool {
        false
    }
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that stands still until advanced, so a 30-day timeout runs in milliseconds.
///
/// ```
/// use cnsm_runtime::clock::{Clock, VirtualClock};
/// let clock = VirtualClock::new(1_000);
/// clock.advance_secs(30 * 24 * 3600);
/// assert_eq!(clock.now_ms(), 1_000 + 30 * 24 * 3600 * 1000);
/// ```
#[derive(Debug, Clone)]
pub struct VirtualClock {
    now_ms: Arc<AtomicU64>,
}

impl VirtualClock {
    pub fn new(start_ms: u64) -> VirtualClock {
        VirtualClock {
            now_ms: Arc::new(AtomicU64::new(start_ms)),
        }
    }

    pub fn advance_ms(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn advance_secs(&self, secs: u64) {
        self.advance_ms(secs.saturating_mul(1000));
    }

    pub fn set_ms(&self, ms: u64) {
        self.now_ms.store(ms, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn is_virtual(&self) -> bool {
        true
    }
}
