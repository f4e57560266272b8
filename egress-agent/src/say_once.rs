//! Saying a problem once per change: the reconcile runs every second and every 10 s even
//! with nothing new, and a log line per run would bury the one that matters.

/// The last value said about one thing (a set of refused objects, a policy's problem, the
/// policy map's fill), so the caller logs only when it changes.
#[derive(Clone, Debug, Default)]
pub struct SayOnce<T> {
    last: T,
}

impl<T: PartialEq> SayOnce<T> {
    /// Starts from `initial`: a first value equal to it is not news.
    pub fn new(initial: T) -> Self {
        Self { last: initial }
    }

    /// Remembers `now`; returns what was said before if `now` differs from it, so the
    /// caller says what changed (`None`: nothing to say).
    pub fn update(&mut self, now: T) -> Option<T> {
        if now == self.last {
            return None;
        }
        Some(std::mem::replace(&mut self.last, now))
    }

    /// The value said last.
    pub fn last(&self) -> &T {
        &self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_each_change_once() {
        let mut missing = SayOnce::new(false);
        assert_eq!(missing.update(false), None);
        assert_eq!(missing.update(true), Some(false));
        assert_eq!(missing.update(true), None);
        assert_eq!(missing.update(false), Some(true));
        assert!(!missing.last());
    }
}
