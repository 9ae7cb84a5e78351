//! When to try a failed write again.
//!
//! `create`, `update` and `delete` run while an API caller waits, so
//! transient failures (throttling, 5xx, timeouts) get a few quick retries and
//! then a clear error; the host, not the broker, does any longer waiting.

/// Total attempts per request, the first included.
pub const MAX_ATTEMPTS: u32 = 3;

/// The pause before the second and third attempts.
pub const BACKOFF_MS: [u64; 2] = [200, 600];

/// A `Retry-After` longer than this is not waited out in-call; the caller
/// gets `throttled` with the delay instead.
pub const MAX_HONOURED_RETRY_AFTER_MS: u64 = 2_000;

/// No retry starts once this much time has passed since the first attempt,
/// so one call stays around five seconds.
pub const BUDGET_MS: u64 = 5_000;

/// The pause before the next attempt, or `None` to give up.
///
/// `failed_attempt` is the 1-based number of the attempt that just failed,
/// `retry_after_ms` what the response asked for (if anything) and
/// `elapsed_ms` the time since the first attempt started.
pub fn next_delay(
    failed_attempt: u32,
    retry_after_ms: Option<u64>,
    elapsed_ms: u64,
) -> Option<u64> {
    if failed_attempt >= MAX_ATTEMPTS {
        return None;
    }
    let index = usize::try_from(failed_attempt.saturating_sub(1)).ok()?;
    let base = *BACKOFF_MS.get(index)?;
    let delay = match retry_after_ms {
        Some(ra) if ra > MAX_HONOURED_RETRY_AFTER_MS => return None,
        Some(ra) => base.max(ra),
        None => base,
    };
    (elapsed_ms.saturating_add(delay) <= BUDGET_MS).then_some(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        assert_eq!(next_delay(1, None, 0), Some(200));
        assert_eq!(next_delay(2, None, 300), Some(600));
        assert_eq!(next_delay(3, None, 1000), None);
    }

    #[test]
    fn honours_small_retry_after_only() {
        assert_eq!(next_delay(1, Some(1000), 0), Some(1000));
        assert_eq!(next_delay(1, Some(50), 0), Some(200));
        assert_eq!(next_delay(1, Some(10_000), 0), None);
    }

    #[test]
    fn stays_within_budget() {
        assert_eq!(next_delay(1, None, 4_900), None);
        assert_eq!(next_delay(2, Some(2_000), 3_500), None);
        // The worst case that is still retried ends within the budget.
        let worst = next_delay(1, Some(2_000), 0).unwrap_or(0)
            + next_delay(2, Some(2_000), 2_000).unwrap_or(0);
        assert!(worst <= BUDGET_MS);
    }
}
