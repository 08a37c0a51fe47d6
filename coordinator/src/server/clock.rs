//! The coordinator's clock: the time since it started, which the round engine is driven by.
//! The real server reads the wall clock; the in-memory harness (`server/memory.rs`, tests
//! only) moves a manual one by hand, so deadlines can be tested without sleeping.

use std::time::{Duration, Instant};

/// Where `now` comes from.
pub(super) enum Clock {
    /// The wall clock, from the coordinator's start.
    Wall(Instant),
    /// A clock that only moves when told ([`Clock::advance`]): no deadline timer runs on it.
    #[cfg(test)]
    Manual(std::sync::Mutex<Duration>),
}

impl Clock {
    /// A wall clock starting now.
    pub(super) fn wall() -> Self {
        Self::Wall(Instant::now())
    }

    /// The time since the start.
    pub(super) fn now(&self) -> Duration {
        match self {
            Self::Wall(started) => started.elapsed(),
            #[cfg(test)]
            Self::Manual(now) => *now.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The instant the wall clock started from (what the deadline timer sleeps until a
    /// deadline after); `None` for a manual clock, which no timer drives.
    pub(super) fn started(&self) -> Option<Instant> {
        match self {
            Self::Wall(started) => Some(*started),
            #[cfg(test)]
            Self::Manual(_) => None,
        }
    }

    /// Moves a manual clock forward by `by` (a wall clock moves by itself: nothing happens).
    #[cfg(test)]
    pub(super) fn advance(&self, by: Duration) {
        if let Self::Manual(now) = self {
            let mut now = now.lock().unwrap_or_else(|p| p.into_inner());
            *now += by;
        }
    }
}
