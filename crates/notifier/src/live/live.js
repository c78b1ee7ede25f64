// The onceflow live view (served at /live). Opens EventSource on
// v1/events?token=... and lists the tenant's job events as they arrive.
// EventSource resumes by itself after a dropped stream, sending Last-Event-ID;
// when it gives up (an HTTP error answer), this page reopens with
// ?last_event_id=, a few times, then says so. Everything shown is set as
// text, never parsed as HTML.
'use strict';

(() => {
  const EVENT_TYPES = ['job.accepted', 'job.processing', 'job.succeeded', 'job.failed', 'job.dead_lettered', 'job.cancelled'];
  // Rows kept on the page; older ones are dropped.
  const MAX_ROWS = 1000;
  // Reopens in a row without a successful connection before giving up.
  const MAX_REOPENS = 5;

  const $ = (id) => document.getElementById(id);
  let source = null;
  let lastId = null;
  let everOpened = false;
  let dropped = false;
  let reopens = 0;
  let reopenTimer = null;
  // The filter of a stream whose token ended: connecting with a new token
  // and the same filter resumes it where it stopped.
  let endedWith = null;

  function setStatus(state, text) {
    $('status').dataset.state = state;
    $('status').textContent = text;
  }

  function notice(kind, text) {
    const item = document.createElement('li');
    item.dataset.kind = kind;
    item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    $('notices').prepend(item);
  }

  function filter() {
    return `${$('job').value.trim()}\n${$('correlation').value.trim()}`;
  }

  function streamUrl(resume) {
    const params = new URLSearchParams({ token: $('token').value.trim() });
    const job = $('job').value.trim();
    const correlation = $('correlation').value.trim();
    if (job) params.set('job_id', job);
    if (correlation) params.set('correlation_id', correlation);
    if (resume && lastId !== null) params.set('last_event_id', lastId);
    return `v1/events?${params}`;
  }

  function details(data) {
    if (data.error) return `${data.error.code}: ${data.error.message}`;
    if (data.result !== null && data.result !== undefined) return JSON.stringify(data.result);
    if (data.progress_percent !== null && data.progress_percent !== undefined) return `${data.progress_percent}%`;
    return data.command_type || '';
  }

  function show(event) {
    lastId = event.lastEventId || lastId;
    let data = {};
    try {
      data = JSON.parse(event.data);
    } catch {
      data = { result: event.data };
    }
    const row = document.createElement('tr');
    row.dataset.id = event.lastEventId;
    row.dataset.type = event.type;
    row.dataset.job = data.job_id || '';
    row.dataset.eventId = data.event_id || '';
    for (const text of [event.lastEventId, new Date().toLocaleTimeString(), event.type,
      data.job_id || '', data.correlation_id || '', details(data)]) {
      const cell = document.createElement('td');
      cell.textContent = text;
      row.append(cell);
    }
    const rows = $('events');
    rows.append(row);
    while (rows.childElementCount > MAX_ROWS) rows.firstElementChild.remove();
  }

  function open(resume) {
    clearTimeout(reopenTimer);
    if (source) source.close();
    setStatus('connecting', 'connecting…');
    source = new EventSource(streamUrl(resume));
    source.onopen = () => {
      reopens = 0;
      if (everOpened && dropped) {
        notice('reconnected', lastId === null ? 'reconnected' : `reconnected, resuming after event ${lastId}`);
      } else if (!everOpened) {
        notice('connected', 'connected');
      }
      everOpened = true;
      dropped = false;
      setStatus('live', 'live');
    };
    source.onerror = () => {
      if (!dropped && everOpened) notice('disconnected', 'stream lost');
      dropped = everOpened;
      if (source.readyState === EventSource.CONNECTING) {
        setStatus('reconnecting', 'reconnecting…');
        return;
      }
      // Closed for good by the browser (an error answer, e.g. an expired token).
      source.close();
      if (reopens >= MAX_REOPENS) {
        setStatus('failed', 'not connected');
        notice('failed', 'the notifier keeps refusing the stream: is the token valid and unexpired?');
        return;
      }
      reopens += 1;
      setStatus('reconnecting', 'reconnecting…');
      reopenTimer = setTimeout(() => open(true), 1000 * 2 ** reopens);
    };
    for (const type of EVENT_TYPES) source.addEventListener(type, show);
    source.addEventListener('stream.gap', (event) => notice('gap', `events missed, no longer retained: ${event.data}`));
    source.addEventListener('stream.lagged', () => notice('lagged', 'fell behind; resuming'));
    // The token expired or was revoked: reconnecting with it would be refused.
    source.addEventListener('stream.closed', (event) => {
      const why = JSON.parse(event.data).reason === 'token_revoked' ? 'was revoked' : 'expired';
      source.close();
      endedWith = filter();
      setStatus('failed', 'not connected');
      notice('closed', `the stream token ${why}: connect with a new one to resume`);
    });
  }

  function connect() {
    // A new token for a stream whose token ended: resume it.
    if (endedWith !== null && endedWith === filter()) {
      endedWith = null;
      dropped = true;
      reopens = 0;
      open(true);
      return;
    }
    // A new token or filter: a new stream, from its start.
    endedWith = null;
    lastId = null;
    everOpened = false;
    dropped = false;
    reopens = 0;
    $('events').replaceChildren();
    open(false);
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('connect').addEventListener('submit', (event) => {
      event.preventDefault();
      connect();
    });
    $('disconnect').addEventListener('click', () => {
      clearTimeout(reopenTimer);
      if (source) source.close();
      source = null;
      setStatus('idle', 'not connected');
    });
    // #token=...&job_id=...&correlation_id=...: the fragment never reaches a
    // server; drop it from the address bar and history once read.
    const fragment = new URLSearchParams(window.location.hash.slice(1));
    if (fragment.has('token')) {
      $('token').value = fragment.get('token');
      $('job').value = fragment.get('job_id') || '';
      $('correlation').value = fragment.get('correlation_id') || '';
      window.history.replaceState(null, '', window.location.pathname + window.location.search);
      connect();
    }
  });
})();
