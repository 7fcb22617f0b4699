//! Group commit: this replica's executors hand their step outcomes, and its triggers their new
//! runs, to a queue, and whatever has gathered goes out as one
//! [`crate::store::Runs::commit_steps`] (or [`crate::store::Runs::create_runs`]) call. An
//! executor's commit may bring back its next step, claimed in the same call.
//!
//! A group goes out as soon as a call is free (at most [`CALLS_IN_FLIGHT`] of a queue are in flight
//! at once), so a lone commit waits for nobody, and under load each call carries many: the
//! store's cost is per call more than per run. There is no committer task: the first waiting
//! caller to get a free call sends the group, its own item and the others', and answers each;
//! an item goes to the store and its outcome comes back with no hop between tasks.

use crate::store::{Created, NewRun, StepCommit, StepCommitted, Store, StoreError, StoreResult};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// How many group calls of one queue may be in flight at once.
const CALLS_IN_FLIGHT: usize = 2;
/// The most items one call carries.
const MAX_GROUP: usize = 32;

/// The executors' step outcomes, committed in groups.
pub(super) type CommitQueue = GroupQueue<StepCommit, StepCommitted>;
/// The triggers' new runs, created in groups.
pub(super) type CreateQueue = GroupQueue<NewRun, Created>;

impl CommitQueue {
    pub(super) fn commits(store: Arc<dyn Store>) -> CommitQueue {
        GroupQueue::new(move |commits| {
            let store = Arc::clone(&store);
            Box::pin(async move { store.commit_steps(commits).await })
        })
    }
}

impl CreateQueue {
    pub(super) fn creations(store: Arc<dyn Store>) -> CreateQueue {
        GroupQueue::new(move |runs| {
            let store = Arc::clone(&store);
            Box::pin(async move { store.create_runs(runs).await })
        })
    }
}

/// One group's call to the store, as sent: an outcome per item, in order, or an error for all.
type Sent<O> = Pin<Box<dyn Future<Output = StoreResult<Vec<O>>> + Send>>;
/// Makes one group's call to the store.
type GroupCall<I, O> = dyn Fn(Vec<I>) -> Sent<O> + Send + Sync;

/// An item waiting for its group, with where its outcome goes.
struct Waiting<I, O> {
    item: I,
    reply: oneshot::Sender<StoreResult<O>>,
}

/// A queue of items waiting for their group call.
pub(super) struct GroupQueue<I, O> {
    shared: Arc<Shared<I, O>>,
}

struct Shared<I, O> {
    /// Oldest first. Every item here has a caller waiting for a free call (see `submit`), or
    /// a task sending what is left (see `Unanswered`).
    waiting: Mutex<VecDeque<Waiting<I, O>>>,
    /// One permit per call that may be in flight.
    calls: Arc<Semaphore>,
    call: Box<GroupCall<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> GroupQueue<I, O> {
    fn new(call: impl Fn(Vec<I>) -> Sent<O> + Send + Sync + 'static) -> GroupQueue<I, O> {
        GroupQueue {
            shared: Arc::new(Shared {
                waiting: Mutex::new(VecDeque::new()),
                calls: Arc::new(Semaphore::new(CALLS_IN_FLIGHT)),
                call: Box::new(call),
            }),
        }
    }

    /// Sends `item` in the next group; its own outcome, as the store's call for one gives it.
    pub(super) async fn submit(&self, item: I) -> StoreResult<O> {
        let (reply, mut outcome) = oneshot::channel();
        self.shared.waiting.lock().push_back(Waiting { item, reply });
        let mut unanswered = Unanswered { shared: Some(Arc::clone(&self.shared)) };
        loop {
            let answered = tokio::select! {
                biased;
                answered = &mut outcome => answered,
                permit = Arc::clone(&self.shared.calls).acquire_owned() => {
                    let Ok(permit) = permit else { continue }; // never closed
                    match self.shared.take_group() {
                        Some(group) => {
                            InFlight::send(&self.shared, group, permit).await;
                            continue;
                        }
                        // Taken by another caller's group, which answers it.
                        None => {
                            drop(permit);
                            (&mut outcome).await
                        }
                    }
                }
            };
            unanswered.shared = None;
            return answered.map_err(|_| {
                StoreError::Unavailable("the replica is stopping: the write's outcome is unknown".to_owned())
            })?;
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Shared<I, O> {
    /// The oldest waiting items, at most [`MAX_GROUP`]; `None` when none wait.
    fn take_group(&self) -> Option<Vec<Waiting<I, O>>> {
        let mut waiting = self.waiting.lock();
        let count = waiting.len().min(MAX_GROUP);
        (count > 0).then(|| waiting.drain(..count).collect())
    }

    /// Sends groups until none wait.
    async fn send_all(self: Arc<Self>) {
        loop {
            let Ok(permit) = Arc::clone(&self.calls).acquire_owned().await else { return };
            let Some(group) = self.take_group() else { return };
            InFlight::send(&self, group, permit).await;
        }
    }
}

/// A caller that may go away (a REST request whose client left) before its item was sent:
/// then a task of its own sends what is left, since no other caller may come to.
struct Unanswered<I: Send + 'static, O: Send + 'static> {
    shared: Option<Arc<Shared<I, O>>>,
}

impl<I: Send + 'static, O: Send + 'static> Drop for Unanswered<I, O> {
    fn drop(&mut self) {
        if let (Some(shared), Ok(runtime)) = (self.shared.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(shared.send_all());
        }
    }
}

/// A group's call in flight, with where its outcomes go and its permit. Dropped before the
/// reply (its caller went away), it is finished on a task of its own, so that every item of
/// the group is still answered.
struct InFlight<O: Send + 'static> {
    sent: Option<Sent<O>>,
    replies: Vec<oneshot::Sender<StoreResult<O>>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<O: Send + 'static> InFlight<O> {
    async fn send<I>(shared: &Shared<I, O>, group: Vec<Waiting<I, O>>, permit: OwnedSemaphorePermit) {
        let (items, replies): (Vec<I>, Vec<_>) = group.into_iter().map(|w| (w.item, w.reply)).unzip();
        let mut in_flight = InFlight { sent: Some((shared.call)(items)), replies, permit: Some(permit) };
        if let Some(sent) = in_flight.sent.as_mut() {
            let result = sent.await;
            in_flight.sent = None;
            answer(result, std::mem::take(&mut in_flight.replies));
        }
    }
}

impl<O: Send + 'static> Drop for InFlight<O> {
    fn drop(&mut self) {
        let Some(sent) = self.sent.take() else { return };
        let (replies, permit) = (std::mem::take(&mut self.replies), self.permit.take());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                answer(sent.await, replies);
                drop(permit);
            });
        }
    }
}

/// Answers each item of a group with its outcome.
fn answer<O>(result: StoreResult<Vec<O>>, replies: Vec<oneshot::Sender<StoreResult<O>>>) {
    let sent = replies.len();
    match result {
        Ok(outcomes) if outcomes.len() == sent => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        failed => {
            // Unknown for every item of the group (see `Runs::commit_group`).
            let err = match failed {
                Ok(outcomes) => StoreError::Corrupt {
                    key: "group call".to_owned(),
                    problem: format!("{} outcomes for {sent} writes", outcomes.len()),
                },
                Err(err) => err,
            };
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// What a test queue's calls did.
    #[derive(Default)]
    struct Calls {
        /// Each call's items, as sent.
        groups: Mutex<Vec<Vec<u32>>>,
        /// The items whose call finished.
        done: Mutex<Vec<u32>>,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    /// A queue whose call answers each item with its double after `delay`, recording in `Calls`.
    fn doubling(delay: Duration) -> (Arc<GroupQueue<u32, u32>>, Arc<Calls>) {
        let calls = Arc::new(Calls::default());
        let seen = Arc::clone(&calls);
        let queue = GroupQueue::new(move |items: Vec<u32>| {
            seen.groups.lock().push(items.clone());
            let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let seen = Arc::clone(&seen);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                seen.done.lock().extend(&items);
                Ok(items.iter().map(|i| i * 2).collect())
            })
        });
        (Arc::new(queue), calls)
    }

    /// Waits (at most 5 s) until the calls of `items` have finished.
    async fn finished(calls: &Calls, items: &[u32]) -> bool {
        for _ in 0..500 {
            if items.iter().all(|item| calls.done.lock().contains(item)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_item_gets_its_own_outcome_in_groups_with_a_bounded_number_of_calls_in_flight() {
        let (queue, calls) = doubling(Duration::from_millis(5));
        let submits = (0..200u32).map(|i| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { (i, queue.submit(i).await) })
        });
        for submitted in futures::future::join_all(submits).await {
            let (i, outcome) = submitted.expect("a submit task");
            assert_eq!(outcome.expect("an outcome"), i * 2);
        }
        let groups = calls.groups.lock();
        let mut sent: Vec<u32> = groups.iter().flatten().copied().collect();
        sent.sort_unstable();
        assert_eq!(sent, (0..200).collect::<Vec<_>>(), "each item is sent exactly once");
        assert!(groups.len() < 200, "items are grouped: {} calls", groups.len());
        assert!(groups.iter().all(|group| !group.is_empty() && group.len() <= MAX_GROUP));
        let most = calls.most_in_flight.load(Ordering::SeqCst);
        assert!(most <= CALLS_IN_FLIGHT, "{most} calls at once, more than {CALLS_IN_FLIGHT}");
    }

    #[tokio::test]
    async fn items_of_callers_that_went_away_are_still_sent_and_answered() {
        let (queue, calls) = doubling(Duration::from_millis(50));
        // A caller that leaves while its own call is in flight: the call is finished anyway.
        assert!(tokio::time::timeout(Duration::from_millis(10), queue.submit(1)).await.is_err());
        assert!(finished(&calls, &[1]).await, "the call of a caller that left is finished");
        // Both calls busy, a caller leaves while its item still waits: it is sent once one is
        // free, with no other caller coming.
        let busy: Vec<_> = [2, 3]
            .into_iter()
            .map(|i| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.submit(i).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(tokio::time::timeout(Duration::from_millis(10), queue.submit(4)).await.is_err());
        for submitted in futures::future::join_all(busy).await {
            assert!(submitted.expect("a submit task").is_ok());
        }
        assert!(finished(&calls, &[2, 3, 4]).await, "the waiting item of a caller that left is sent");
        // A later caller is answered: no call was lost with the callers that left.
        assert_eq!(queue.submit(5).await.expect("an outcome"), 10);
        let mut sent: Vec<u32> = calls.groups.lock().iter().flatten().copied().collect();
        sent.sort_unstable();
        assert_eq!(sent, [1, 2, 3, 4, 5], "every item is sent, exactly once");
        assert_eq!(calls.in_flight.load(Ordering::SeqCst), 0);
    }
}
