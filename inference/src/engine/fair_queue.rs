//! The engine's waiting room: one FIFO per tenant, served in weighted fair
//! order (start-time fair queueing over tenants).
//!
//! Each tenant has a finish tag: the virtual time at which the work it was
//! already given ends, counting each admitted request as `cost / weight`. The
//! next request is the head of the tenant whose start tag,
//! `max(virtual time, finish tag)`, is smallest; the virtual time then moves
//! to that start tag. A tenant that was idle starts at the current virtual
//! time: it banks no credit while away, and it does not wait behind what a
//! busy tenant was already given, so a flood delays another tenant's next
//! request by about one admission per competing tenant, however deep the
//! flood's queue. Ties go to the request that arrived first. Work charged but
//! not done (a sample that stopped early, a cancelled request) is refunded.
//!
//! With fairness off every request joins one lane: first come, first served.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::engine::request::Tenant;

pub(crate) struct FairQueue<T> {
    fair: bool,
    lanes: HashMap<Arc<str>, Lane<T>>,
    /// The start tag of the last request taken.
    vtime: f64,
    arrivals: u64,
    len: usize,
}

struct Lane<T> {
    jobs: VecDeque<Queued<T>>,
    finish: f64,
    weight: f64,
}

struct Queued<T> {
    arrival: u64,
    cost: f64,
    item: T,
}

impl<T> FairQueue<T> {
    pub fn new(fair: bool) -> Self {
        Self { fair, lanes: HashMap::new(), vtime: 0.0, arrivals: 0, len: 0 }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn lane_id(&self, tenant: &Tenant) -> Arc<str> {
        if self.fair { tenant.id.clone() } else { Arc::from("") }
    }

    /// Queues `item` as `tenant`'s, costing `cost` tokens of work.
    pub fn push(&mut self, tenant: &Tenant, cost: u64, item: T) {
        let id = self.lane_id(tenant);
        // The latest weight wins: an operator's change applies to what waits.
        let weight = f64::from(tenant.weight.max(1));
        let lane = self.lanes.entry(id).or_insert_with(|| Lane { jobs: VecDeque::new(), finish: 0.0, weight });
        lane.weight = weight;
        lane.jobs.push_back(Queued { arrival: self.arrivals, cost: cost as f64, item });
        self.arrivals += 1;
        self.len += 1;
    }

    /// The lane whose head request is next in fair order.
    fn next_lane(&self) -> Option<&Arc<str>> {
        self.lanes
            .iter()
            .filter_map(|(id, lane)| lane.jobs.front().map(|head| (id, lane.finish.max(self.vtime), head.arrival)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.cmp(&b.2)))
            .map(|(id, _, _)| id)
    }

    /// The request [`pop`](Self::pop) would take.
    pub fn peek(&self) -> Option<&T> {
        let id = self.next_lane()?;
        self.lanes.get(id)?.jobs.front().map(|q| &q.item)
    }

    /// Takes the next request in fair order and charges its tenant.
    pub fn pop(&mut self) -> Option<T> {
        let id = self.next_lane()?.clone();
        let (item, start) = self.take_head(&id)?;
        self.vtime = start;
        self.forget_idle();
        Some(item)
    }

    /// `tenant`'s oldest waiting request.
    pub fn peek_tenant(&self, tenant: &Tenant) -> Option<&T> {
        self.lanes.get(&self.lane_id(tenant))?.jobs.front().map(|q| &q.item)
    }

    /// Takes `tenant`'s oldest request out of fair order (the batcher does so
    /// for a tenant with nothing running, which starts level with the
    /// virtual time anyway) and charges the tenant as [`pop`](Self::pop)
    /// would; the virtual time stays where it is, so the others' order is
    /// unchanged.
    pub fn pop_tenant(&mut self, tenant: &Tenant) -> Option<T> {
        let (item, _) = self.take_head(&self.lane_id(tenant))?;
        self.forget_idle();
        Some(item)
    }

    /// Removes lane `id`'s head, charging the lane; returns it with its start tag.
    fn take_head(&mut self, id: &Arc<str>) -> Option<(T, f64)> {
        let lane = self.lanes.get_mut(id)?;
        let queued = lane.jobs.pop_front()?;
        let start = lane.finish.max(self.vtime);
        lane.finish = start + queued.cost / lane.weight;
        self.len -= 1;
        Some((queued.item, start))
    }

    /// Gives back `unused` tokens of work charged to `tenant` but not done.
    pub fn refund(&mut self, tenant: &Tenant, unused: u64) {
        let id = self.lane_id(tenant);
        let vtime = self.vtime;
        if let Some(lane) = self.lanes.get_mut(&id) {
            lane.finish = (lane.finish - unused as f64 / lane.weight).max(vtime);
        }
        self.forget_idle();
    }

    /// Removes the requests `keep` refuses (cancelled ones) and returns them.
    pub fn remove_unless(&mut self, mut keep: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut removed = Vec::new();
        for lane in self.lanes.values_mut() {
            let mut kept = VecDeque::with_capacity(lane.jobs.len());
            for queued in lane.jobs.drain(..) {
                if keep(&queued.item) { kept.push_back(queued) } else { removed.push(queued.item) }
            }
            lane.jobs = kept;
        }
        self.len -= removed.len();
        self.forget_idle();
        removed
    }

    /// An empty lane whose work is behind the virtual time is the same as no
    /// lane; dropping it keeps the map as small as the set of active tenants.
    fn forget_idle(&mut self) {
        let vtime = self.vtime;
        self.lanes.retain(|_, lane| !lane.jobs.is_empty() || lane.finish > vtime);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, weight: u32) -> Tenant {
        Tenant::new(id, weight)
    }

    fn drain(queue: &mut FairQueue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| queue.pop()).collect()
    }

    #[test]
    fn a_late_tenant_goes_before_a_deep_flood() {
        let mut queue = FairQueue::new(true);
        let flood = tenant("flood", 1);
        for _ in 0..100 {
            queue.push(&flood, 74, "flood");
        }
        // The flood has been running for a while.
        for _ in 0..10 {
            queue.pop();
        }
        queue.push(&tenant("victim", 1), 11, "victim");
        assert_eq!(queue.pop(), Some("victim"));
        assert_eq!(queue.len(), 90);
    }

    #[test]
    fn without_fairness_it_is_first_come_first_served() {
        let mut queue = FairQueue::new(false);
        queue.push(&tenant("a", 1), 74, "a1");
        queue.push(&tenant("a", 1), 74, "a2");
        queue.push(&tenant("b", 1), 1, "b1");
        assert_eq!(drain(&mut queue), ["a1", "a2", "b1"]);
    }

    #[test]
    fn equal_tenants_alternate_and_weights_divide_the_work() {
        let mut queue = FairQueue::new(true);
        for _ in 0..4 {
            queue.push(&tenant("a", 1), 10, "a");
            queue.push(&tenant("b", 1), 10, "b");
        }
        assert_eq!(drain(&mut queue), ["a", "b", "a", "b", "a", "b", "a", "b"]);

        let mut queue = FairQueue::new(true);
        for _ in 0..9 {
            queue.push(&tenant("light", 1), 10, "light");
            queue.push(&tenant("heavy", 3), 10, "heavy");
        }
        let first_eight = drain(&mut queue).into_iter().take(8).collect::<Vec<_>>();
        let heavy = first_eight.iter().filter(|&&t| t == "heavy").count();
        assert_eq!(heavy, 6, "weight 3 against 1 gets three quarters: {first_eight:?}");
    }

    #[test]
    fn samples_count_as_work() {
        // Four samples of 16 tokens cost four times one sample: a tenant
        // sending n = 4 gets a quarter of the requests of one sending n = 1.
        let mut queue = FairQueue::new(true);
        for _ in 0..10 {
            queue.push(&tenant("n4", 1), 64, "n4");
            queue.push(&tenant("n1", 1), 16, "n1");
        }
        let first_ten = drain(&mut queue).into_iter().take(10).collect::<Vec<_>>();
        assert_eq!(first_ten.iter().filter(|&&t| t == "n1").count(), 8, "{first_ten:?}");
    }

    #[test]
    fn idle_time_banks_no_credit_and_refunds_return_unused_work() {
        let mut queue = FairQueue::new(true);
        queue.push(&tenant("a", 1), 100, "a");
        assert_eq!(queue.pop(), Some("a"));
        for _ in 0..3 {
            queue.push(&tenant("b", 1), 100, "b");
        }
        queue.push(&tenant("a", 1), 100, "a");
        // a's first request is still charged, so b goes first once.
        assert_eq!(queue.pop(), Some("b"));
        // a stopped early: its unused work comes back, and it is next.
        queue.refund(&tenant("a", 1), 100);
        assert_eq!(queue.pop(), Some("a"));
        assert_eq!(drain(&mut queue), ["b", "b"]);
        assert!(!queue.lanes.contains_key("a"), "an idle lane behind the virtual time is forgotten");
    }

    #[test]
    fn a_tenant_taken_out_of_order_is_charged_and_leaves_the_others_order_alone() {
        let mut queue = FairQueue::new(true);
        for _ in 0..3 {
            queue.push(&tenant("a", 1), 10, "a");
            queue.push(&tenant("b", 1), 10, "b");
        }
        queue.push(&tenant("c", 1), 10, "c");
        assert_eq!(queue.peek_tenant(&tenant("c", 1)), Some(&"c"));
        assert_eq!(queue.pop_tenant(&tenant("c", 1)), Some("c"));
        assert_eq!(queue.pop_tenant(&tenant("c", 1)), None);
        assert_eq!(queue.len(), 6);
        // c was charged for the request taken: its next one ties with the
        // second requests of a and b (uncharged, it would go third).
        queue.push(&tenant("c", 1), 10, "c");
        assert_eq!(drain(&mut queue), ["a", "b", "a", "b", "c", "a", "b"]);
    }

    #[test]
    fn cancelled_requests_leave_the_queue() {
        let mut queue = FairQueue::new(true);
        queue.push(&tenant("a", 1), 1, "keep");
        queue.push(&tenant("a", 1), 1, "drop");
        queue.push(&tenant("b", 1), 1, "drop");
        assert_eq!(queue.remove_unless(|&item| item == "keep"), ["drop", "drop"]);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.peek(), Some(&"keep"));
    }
}
