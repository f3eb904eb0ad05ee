//! Counts what waits in the engine's queue, so that a submission is refused
//! at once, before it is queued: when the whole queue is full (requests,
//! `Overloaded`), or when its tenant already has its share of the queue
//! waiting (samples, `QueueShareExceeded`). Shared by the submitting side and
//! the batching thread, which releases a request when it leaves the queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::request::GenerateRequest;
use crate::error::{Error, Result};

pub(crate) struct QueueAccount {
    /// Requests that may wait at once.
    capacity: usize,
    /// Samples one named tenant may have waiting (`None`: no per-tenant cap).
    tenant_limit: Option<usize>,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    requests: usize,
    samples: HashMap<Arc<str>, usize>,
}

impl QueueAccount {
    pub fn new(capacity: usize, tenant_limit: Option<usize>) -> Self {
        Self { capacity: capacity.max(1), tenant_limit, counts: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every update is one statement.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves room for all of `requests` or for none. A tenant with
    /// nothing waiting may always queue one submission, however many samples
    /// it has, so a cap below one request's samples cannot lock a tenant out.
    pub fn reserve(&self, requests: &[GenerateRequest]) -> Result<()> {
        let mut counts = self.lock();
        if counts.requests + requests.len() > self.capacity {
            return Err(Error::Overloaded);
        }
        if let Some(limit) = self.tenant_limit {
            let mut adding: HashMap<&Arc<str>, usize> = HashMap::new();
            for request in requests.iter().filter(|r| !r.tenant.is_unnamed()) {
                *adding.entry(&request.tenant.id).or_default() += request.samples();
            }
            for (tenant, samples) in &adding {
                let queued = counts.samples.get(*tenant).copied().unwrap_or(0);
                if queued > 0 && queued + samples > limit {
                    return Err(Error::QueueShareExceeded { queued, limit });
                }
            }
        }
        counts.requests += requests.len();
        for request in requests.iter().filter(|r| !r.tenant.is_unnamed()) {
            *counts.samples.entry(request.tenant.id.clone()).or_default() += request.samples();
        }
        Ok(())
    }

    /// `request` left the queue (admitted, cancelled, or never sent).
    pub fn release(&self, request: &GenerateRequest) {
        let mut counts = self.lock();
        counts.requests = counts.requests.saturating_sub(1);
        if request.tenant.is_unnamed() {
            return;
        }
        if let Some(samples) = counts.samples.get_mut(&request.tenant.id) {
            *samples = samples.saturating_sub(request.samples());
            if *samples == 0 {
                counts.samples.remove(&request.tenant.id);
            }
        }
    }

    /// Requests waiting.
    pub fn depth(&self) -> usize {
        self.lock().requests
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::Tenant;

    fn request(tenant: &str, n: usize) -> GenerateRequest {
        let mut r = GenerateRequest::new(vec![1, 2, 3], 4);
        r.tenant = Tenant::new(tenant, 1);
        r.n = n;
        r
    }

    #[test]
    fn a_tenant_is_held_to_its_share_while_others_still_get_in() {
        let account = QueueAccount::new(100, Some(8));
        account.reserve(&[request("flood", 4), request("flood", 4)]).unwrap();
        let refused = account.reserve(&[request("flood", 1)]);
        assert!(matches!(refused, Err(Error::QueueShareExceeded { queued: 8, limit: 8 })), "{refused:?}");
        account.reserve(&[request("victim", 1)]).unwrap();
        account.release(&request("flood", 4));
        account.reserve(&[request("flood", 4)]).unwrap();
        assert_eq!(account.depth(), 3);
    }

    #[test]
    fn a_submission_goes_in_whole_or_not_at_all() {
        let account = QueueAccount::new(3, Some(100));
        let refused = account.reserve(&[request("a", 1), request("a", 1), request("b", 1), request("b", 1)]);
        assert!(matches!(refused, Err(Error::Overloaded)));
        assert_eq!(account.depth(), 0);
        // Alone, one submission may exceed the share; the next one waits.
        let account = QueueAccount::new(100, Some(4));
        account.reserve(&[request("a", 4), request("a", 4)]).unwrap();
        assert!(account.reserve(&[request("a", 1)]).is_err());
    }

    #[test]
    fn unnamed_callers_have_no_share_cap() {
        let account = QueueAccount::new(100, Some(1));
        for _ in 0..10 {
            account.reserve(&[GenerateRequest::new(vec![1], 1)]).unwrap();
        }
        assert_eq!(account.depth(), 10);
    }
}
