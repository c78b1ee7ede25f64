//! Faults injected into a processor's database.

/// Make `db` (a processor's database) refuse every posting with the
/// PostgreSQL error `errcode` (e.g. `check_violation`, which the processor
/// takes for a data error; `serialization_failure`, an outage) until
/// [`allow_postings`]. Each refusal is counted in the sequence
/// `refused_postings`, outside every transaction (a sequence does not roll
/// back).
pub async fn refuse_postings(db: &sqlx::PgPool, errcode: &str) {
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE IF NOT EXISTS refused_postings;
         CREATE OR REPLACE FUNCTION refuse_posting() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM nextval('refused_postings');
             RAISE EXCEPTION 'injected fault' USING ERRCODE = '{errcode}';
         END $$;
         CREATE TRIGGER refuse_posting BEFORE INSERT ON postings FOR EACH ROW EXECUTE FUNCTION refuse_posting();"
    ))
    .execute(db)
    .await
    .expect("inject the fault");
}

/// End [`refuse_postings`]: the fault is repaired.
pub async fn allow_postings(db: &sqlx::PgPool) {
    sqlx::raw_sql("DROP TRIGGER refuse_posting ON postings").execute(db).await.expect("repair");
}
