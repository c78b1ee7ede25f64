//! The stream hub: one per notifier instance. It tails the events table (woken
//! by `NOTIFY`, polling as a fallback) and broadcasts each new event to the
//! instance's subscribers through a bounded `broadcast` channel.
//!
//! Because it reads the shared table rather than its own Kafka partitions,
//! every instance serves every subscriber, whichever instance consumed the
//! event. A subscriber that falls more than the channel's capacity behind gets
//! `Lagged` and is disconnected; it resumes from the table with `Last-Event-ID`,
//! so the hub never waits for a slow client.

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::store::{self, StoredEvent};

const CHANNEL: &str = "onceflow_events";
const FALLBACK_POLL: Duration = Duration::from_secs(1);
const PAGE: i64 = 1000;

/// Hands out subscriptions to the live feed.
#[derive(Clone, Debug)]
pub struct Hub {
    sender: broadcast::Sender<Arc<StoredEvent>>,
}

impl Hub {
    pub fn new(buffer: usize) -> Self {
        Self { sender: broadcast::channel(buffer.max(1)).0 }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.sender.subscribe()
    }

    /// Tail the table until `shutdown`, starting after what exists now.
    pub async fn run(self, pool: PgPool, shutdown: CancellationToken) {
        let mut last = loop {
            match store::latest_seq(&pool).await {
                Ok(seq) => break seq,
                Err(error) => {
                    tracing::warn!(%error, "hub cannot read the events table; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(FALLBACK_POLL) => {}
                    }
                }
            }
        };
        let mut listener = None;
        loop {
            if listener.is_none() {
                listener = listen(&pool).await;
            }
            match store::all_after(&pool, last, PAGE).await {
                Ok(events) => {
                    let full_page = events.len() == PAGE as usize;
                    for event in events {
                        last = event.seq;
                        // No subscribers is not an error: nobody is listening.
                        let _ = self.sender.send(event);
                    }
                    if full_page {
                        continue;
                    }
                }
                Err(error) => tracing::warn!(%error, "hub read failed"),
            }
            let wake = async {
                match listener.as_mut() {
                    Some(l) => {
                        if l.recv().await.is_err() {
                            listener = None;
                        }
                    }
                    None => tokio::time::sleep(FALLBACK_POLL).await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = wake => {}
                () = tokio::time::sleep(FALLBACK_POLL) => {}
            }
        }
    }
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = PgListener::connect_with(pool).await.ok()?;
    listener.listen(CHANNEL).await.ok()?;
    Some(listener)
}
