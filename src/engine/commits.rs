//! Group commit: this replica's executors hand their step outcomes to a few committers, which
//! send whatever has gathered as one [`crate::store::Runs::commit_group`] call.
//!
//! A group goes out as soon as a committer is free (the previous call's reply is back), so a
//! lone commit waits for nobody, and under load each call carries many: the store's cost is per
//! call more than per run. At most [`COMMITTERS`] calls are in flight at once.

use crate::store::{Commit, CommitOutcome, Store, StoreError, StoreResult};
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

/// How many group calls may be in flight at once.
const COMMITTERS: usize = 2;
/// The most commits one call carries.
const MAX_GROUP: usize = 32;

/// A commit waiting for its group, with where its outcome goes.
struct Waiting {
    commit: Commit,
    reply: oneshot::Sender<StoreResult<CommitOutcome>>,
}

/// The queue the executors commit through. The committers end when it is dropped.
pub(super) struct CommitQueue {
    sender: mpsc::UnboundedSender<Waiting>,
}

impl CommitQueue {
    pub(super) fn new(store: Arc<dyn Store>) -> CommitQueue {
        let (sender, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..COMMITTERS {
            tokio::spawn(committer(Arc::clone(&store), Arc::clone(&receiver)));
        }
        CommitQueue { sender }
    }

    /// Commits `commit` in the next group; its own outcome, as [`crate::store::Runs::commit`] gives it.
    pub(super) async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        let (reply, outcome) = oneshot::channel();
        let gone = || StoreError::Unavailable("the replica is stopping: the commit was not sent".to_owned());
        self.sender.send(Waiting { commit, reply }).map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

/// Takes what has gathered (at least one, at most [`MAX_GROUP`]), commits it, answers each.
async fn committer(store: Arc<dyn Store>, receiver: Arc<Mutex<mpsc::UnboundedReceiver<Waiting>>>) {
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
        let (commits, replies): (Vec<Commit>, Vec<_>) = group.into_iter().map(|w| (w.commit, w.reply)).unzip();
        match store.commit_group(commits).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                // Unknown for every commit of the group (see `Runs::commit_group`).
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}
