//! The synthetic probe's records, and their pruning (`[probe_records]` of
//! every service).
//!
//! `onceflow probe` submits a [`COMMAND_TYPE`] command every minute as a
//! tenant of its own; each leaves records in every service (ingest's job and
//! idempotency key, the processor's inbox row, the notifier's events) that
//! nobody reads once the probe has timed them. Each service deletes its share
//! once older than [`ProbeRecords::retain_secs`], in bounded batches, with
//! [`ProbeRecords::prune_periodically`] and a statement of its own.
//!
//! Safety: a sweep deletes only rows that are BOTH of [`ProbeRecords::tenant`]
//! AND of the command type [`COMMAND_TYPE`]. A tenant name set to a real
//! tenant's by mistake therefore deletes nothing but that tenant's probe
//! commands, never a ledger posting's job or event; another tenant's probe
//! commands are not touched either.

use std::{
    num::{NonZeroU32, NonZeroU64},
    time::Duration,
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The synthetic probe's command type (declared in the catalogue's
/// built-ins, served by the processor's built-in handler, sent by
/// `onceflow probe`), and the only type a probe-records sweep deletes.
pub const COMMAND_TYPE: &str = "onceflow.probe";

/// Rows of probe records deleted, per service.
pub const PRUNED_TOTAL: &str = "onceflow_probe_records_pruned_total";

/// `[probe_records]` of a service's configuration. Every field has a
/// default, so a configuration may leave out the section or any key of it.
/// The sweep's interval and batch are never 0, which would make it spin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeRecords {
    /// The tenant `onceflow probe` submits as.
    pub tenant: String,
    /// How long the records of the tenant's probe commands are kept; 0: never pruned.
    pub retain_secs: u64,
    /// How often the sweep looks for records older than that.
    pub sweep_interval_secs: NonZeroU64,
    /// The most rows one statement of the sweep deletes.
    pub sweep_batch: NonZeroU32,
}

impl Default for ProbeRecords {
    fn default() -> Self {
        Self {
            tenant: "probe".to_owned(),
            retain_secs: 86_400,
            sweep_interval_secs: NonZeroU64::new(60).expect("not 0"),
            sweep_batch: NonZeroU32::new(1000).expect("not 0"),
        }
    }
}

impl ProbeRecords {
    /// Run `delete` until it deletes fewer than `sweep_batch` rows, every
    /// `sweep_interval_secs`, until `shutdown`, counting the rows in
    /// [`PRUNED_TOTAL`]; with `retain_secs` 0, return at once.
    ///
    /// `delete` is one bounded batch of a service's probe records: a
    /// statement that deletes at most `$3` rows of the tenant `$1` older
    /// than `$2` seconds, and only those whose command type is
    /// [`COMMAND_TYPE`], which it names as a literal (so the planner may use
    /// a partial index on it), and whose row count is the rows it deleted.
    pub async fn prune_periodically(&self, pool: &PgPool, delete: &str, shutdown: CancellationToken) {
        debug_assert!(delete.contains(&format!("'{COMMAND_TYPE}'")), "a probe-records sweep names the type: {delete}");
        if self.retain_secs == 0 {
            tracing::info!(tenant = %self.tenant, "probe_records.retain_secs is 0: the probe's records are kept");
            return;
        }
        let retain_secs = Duration::from_secs(self.retain_secs).as_secs_f64();
        let batch = self.sweep_batch.get();
        crate::postgres::in_batches_periodically(
            "synthetic probe records",
            u64::from(batch),
            Duration::from_secs(self.sweep_interval_secs.get()),
            shutdown,
            || async move {
                let deleted = sqlx::query(delete)
                    .bind(&self.tenant)
                    .bind(retain_secs)
                    .bind(i64::from(batch))
                    .execute(pool)
                    .await?
                    .rows_affected();
                metrics::counter!(PRUNED_TOTAL).increment(deleted);
                Ok(deleted)
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct Service {
        #[serde(default)]
        probe_records: ProbeRecords,
    }

    fn parse(toml: &str) -> Result<ProbeRecords, crate::Error> {
        crate::config::load::<Service>(toml, None).map(|service| service.probe_records)
    }

    #[test]
    fn the_section_and_each_key_may_be_left_out() {
        assert_eq!(parse("").unwrap(), ProbeRecords::default());
        let keep = parse("[probe_records]\nretain_secs = 0\n").unwrap();
        assert_eq!(keep, ProbeRecords { retain_secs: 0, ..ProbeRecords::default() });
        assert_eq!(keep.tenant, "probe");
    }

    #[test]
    fn every_key_is_read_and_a_misspelt_one_refused() {
        let fast = parse(
            "[probe_records]\ntenant = \"synthetic\"\nretain_secs = 1\nsweep_interval_secs = 2\nsweep_batch = 3\n",
        )
        .unwrap();
        assert_eq!(fast.tenant, "synthetic");
        assert_eq!((fast.retain_secs, fast.sweep_interval_secs.get(), fast.sweep_batch.get()), (1, 2, 3));
        let misspelt = parse("[probe_records]\nretain = 1\n").unwrap_err().to_string();
        assert!(misspelt.contains("retain"), "{misspelt}");
    }

    #[test]
    fn a_sweep_that_would_spin_is_refused() {
        for zero in ["sweep_interval_secs", "sweep_batch"] {
            let error = parse(&format!("[probe_records]\n{zero} = 0\n")).unwrap_err().to_string();
            assert!(error.contains(zero), "{error}");
        }
    }
}
