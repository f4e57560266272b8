//! Errors in log lines. Every error type keeps its cause in `source()` and does not repeat it
//! in its message (aya's convention), so a log line shows the whole chain through [`Chain`],
//! as `{:#}` does for the command line's errors.

use std::{error::Error, fmt};

/// Displays an error and each of its causes, joined by `: `.
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot attach from_pod to veth1")]
    struct Attach(#[source] std::io::Error);

    #[test]
    fn shows_each_cause_once() {
        let error = Attach(std::io::Error::other("device busy"));
        assert_eq!(
            Chain(&error).to_string(),
            "cannot attach from_pod to veth1: device busy"
        );
    }
}
