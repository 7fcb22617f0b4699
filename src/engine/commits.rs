//! Group commit: this replica's executors hand their step outcomes, and its triggers their new
//! runs, to a few committers, which send whatever has gathered as one
//! [`crate::store::Runs::commit_steps`] (or [`crate::store::Runs::create_runs`]) call. An
//! executor's commit may bring back its next step, claimed in the same call.
//!
//! A group goes out as soon as a committer is free (the previous call's reply is back), so a
//! lone commit waits for nobody, and under load each call carries many: the store's cost is per
//! call more than per run. At most [`COMMITTERS`] calls of a queue are in flight at once.

use crate::store::{Created, NewRun, StepCommit, StepCommitted, Store, StoreError, StoreResult};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

/// How many group calls of one queue may be in flight at once.
const COMMITTERS: usize = 2;
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

/// One group's call to the store: an outcome per item, in order, or an error for all.
type GroupCall<I, O> = dyn Fn(Vec<I>) -> Pin<Box<dyn Future<Output = StoreResult<Vec<O>>> + Send>> + Send + Sync;

/// An item waiting for its group, with where its outcome goes.
struct Waiting<I, O> {
    item: I,
    reply: oneshot::Sender<StoreResult<O>>,
}

/// A queue whose committers end when it is dropped.
pub(super) struct GroupQueue<I, O> {
    sender: mpsc::UnboundedSender<Waiting<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> GroupQueue<I, O> {
    fn new(
        call: impl Fn(Vec<I>) -> Pin<Box<dyn Future<Output = StoreResult<Vec<O>>> + Send>> + Send + Sync + 'static,
    ) -> GroupQueue<I, O> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        let call: Arc<GroupCall<I, O>> = Arc::new(call);
        for _ in 0..COMMITTERS {
            tokio::spawn(committer(Arc::clone(&call), Arc::clone(&receiver)));
        }
        GroupQueue { sender }
    }

    /// Sends `item` in the next group; its own outcome, as the store's call for one gives it.
    pub(super) async fn submit(&self, item: I) -> StoreResult<O> {
        let (reply, outcome) = oneshot::channel();
        let gone = || StoreError::Unavailable("the replica is stopping: the write was not sent".to_owned());
        self.sender.send(Waiting { item, reply }).map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

/// Takes what has gathered (at least one, at most [`MAX_GROUP`]), sends it, answers each.
async fn committer<I, O>(call: Arc<GroupCall<I, O>>, receiver: Arc<Mutex<mpsc::UnboundedReceiver<Waiting<I, O>>>>) {
    loop {
        let mut group = Vec::new();
        {
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(first) => group.push(first),
                None => return,
            }
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
        }
        let (items, replies): (Vec<I>, Vec<_>) = group.into_iter().map(|w| (w.item, w.reply)).unzip();
        let sent = items.len();
        match call(items).await {
            Ok(outcomes) if outcomes.len() == sent => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Ok(outcomes) => {
                let err = StoreError::Corrupt {
                    key: "group call".to_owned(),
                    problem: format!("{} outcomes for {sent} writes", outcomes.len()),
                };
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
            Err(err) => {
                // Unknown for every item of the group (see `Runs::commit_group`).
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}
