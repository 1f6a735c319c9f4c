#!/usr/bin/env node
// Runs a scripted stripe-node sequence against one base URL and prints its normalised results.
//
//   node tests/node/sdk_check.js http://127.0.0.1:8080     (or STRIPE_BASE_URL=...)
//
// Prints one JSON document: {"sdk": ..., "steps": {label: result-or-error}}. Generated ids,
// timestamps and loopback ports are replaced by stable placeholders so that a run against
// the simulator and a run through the sidecar can be compared as they are. Stripe errors are
// results here; only a broken script exits non-zero.
'use strict';

const crypto = require('node:crypto');
const Stripe = require('stripe');

const KEY = process.env.STRIPE_KEY || 'sk_test_51NodeParityKey0000wxyz';
const READONLY_KEY = 'rk_test_readonly_nodeparity9876';
const BAD_KEY = 'sk_tset_notakeyatall00001234';

const base = new URL(process.argv[2] || process.env.STRIPE_BASE_URL || 'http://localhost:8080');

function client(key = KEY) {
  const protocol = base.protocol.replace(':', '');
  return new Stripe(key, {
    host: base.hostname,
    port: Number(base.port) || (protocol === 'https' ? 443 : 80),
    protocol,
    maxNetworkRetries: 0,
  });
}

// --- normalising ------------------------------------------------------------------------------

// A generated id: Stripe prefix words, then a random suffix (simulator suffixes are 14+ long).
const ID = /(?<![A-Za-z0-9])([a-z]+(?:_[a-z]+)*)_[A-Za-z0-9]{14,}(?![A-Za-z0-9])/g;
const LOOPBACK = /http:\/\/127\.0\.0\.1:\d+/g;
const LOG_TIME = /\bt=\d+/g;
// Fields whose values come from the clock or from a generated id.
const VOLATILE = new Set(['created', 'timestamp', 'invoice_prefix']);

function canonicaliser() {
  const ids = new Map();
  const counts = new Map();
  const canon = (value) => {
    if (Array.isArray(value)) return value.map(canon);
    if (value !== null && typeof value === 'object') {
      const out = {};
      for (const [k, v] of Object.entries(value)) {
        out[k] = VOLATILE.has(k) && v !== null && v !== undefined ? '<volatile>' : canon(v);
      }
      return out;
    }
    if (typeof value === 'string') {
      return value
        .replace(LOOPBACK, '<loopback>')
        .replace(LOG_TIME, 't=<time>')
        .replace(ID, (found, prefix) => {
          if (!ids.has(found)) {
            const n = (counts.get(prefix) || 0) + 1;
            counts.set(prefix, n);
            ids.set(found, `<${prefix}:${n}>`);
          }
          return ids.get(found);
        });
    }
    return value === undefined ? null : value;
  };
  return canon;
}

function header(headers, name) {
  if (!headers) return null;
  const value = headers[name];
  return value === undefined ? null : value;
}

function errorRecord(err) {
  if (!(err instanceof Stripe.errors.StripeError)) {
    return {thrown: err && err.name, message: String(err && err.message)};
  }
  return {
    raised: err.type,
    rawType: err.rawType ?? null,
    statusCode: err.statusCode ?? null,
    code: err.code ?? null,
    param: err.param ?? null,
    decline_code: err.decline_code ?? null,
    doc_url: err.doc_url ?? null,
    message: err.message,
    payment_intent: err.payment_intent ?? null,
    request_log_url: err.request_log_url ?? null,
    requestId: err.requestId ?? null,
    replayed: header(err.headers, 'idempotent-replayed'),
  };
}

function valueRecord(value) {
  if (Buffer.isBuffer(value)) {
    return {bytes: value.length, sha256: crypto.createHash('sha256').update(value).digest('hex')};
  }
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const resp = value.lastResponse;
    return {
      object: value.object ?? null,
      status: resp ? resp.statusCode : null,
      replayed: resp ? header(resp.headers, 'idempotent-replayed') : null,
      fields: JSON.parse(JSON.stringify(value)),
    };
  }
  return {value};
}

class Steps {
  constructor() {
    this.raw = {};
  }

  // Run `fn`; return its value, or the error it threw (both are recorded under `label`).
  async call(label, fn) {
    if (label in this.raw) throw new Error(`duplicate step label: ${label}`);
    try {
      const value = await fn();
      this.raw[label] = valueRecord(value);
      return value;
    } catch (err) {
      this.raw[label] = errorRecord(err);
      return err;
    }
  }

  results() {
    return canonicaliser()(this.raw);
  }
}

// --- the sequence -----------------------------------------------------------------------------

const SMALL_FILE = Buffer.concat([Buffer.from('%PDF-1.4 node parity\n'), Buffer.alloc(2048, 7)]);
const LARGE_FILE = Buffer.alloc(1536 * 1024, 'stripe'); // past the sidecar's buffer limits

async function contents(url) {
  // An app downloads a file by GETting its url; here always through the base under test.
  const resp = await fetch(base.origin + new URL(url).pathname, {
    headers: {Authorization: `Bearer ${KEY}`},
  });
  if (resp.status !== 200) throw new Error(`contents answered ${resp.status}`);
  return Buffer.from(await resp.arrayBuffer());
}

async function run() {
  const stripe = client();
  const steps = new Steps();

  // customers: create, retrieve, update, list (one page and auto-paged), delete
  const ids = [];
  for (let n = 0; n < 5; n++) {
    const cus = await steps.call(`customer create ${n}`, () =>
      stripe.customers.create({
        email: `n${n}@example.com`,
        name: `Node ${n}`,
        metadata: {ref: `node-cus-${n}`, tier: n % 2 ? 'gold' : 'silver'},
      }));
    ids.push(cus.id);
  }
  await steps.call('customer retrieve', () => stripe.customers.retrieve(ids[0]));
  await steps.call('customer update', () =>
    stripe.customers.update(ids[0], {
      name: 'Zoë Ångström ✓ & Co = 100%', metadata: {tier: '', vip: 'yes', note: 'a+b c&d=%é'},
    }));
  await steps.call('customer page', () => stripe.customers.list({limit: 2}));
  await steps.call('customer auto-paged', async () => {
    const seen = [];
    for await (const c of stripe.customers.list({limit: 2})) seen.push(c.id);
    return seen;
  });
  await steps.call('customer delete', () => stripe.customers.del(ids[1]));
  await steps.call('customer retrieve deleted', () => stripe.customers.retrieve(ids[1]));
  await steps.call('customer auto-paged after delete', () =>
    stripe.customers.list({limit: 2}).autoPagingToArray({limit: 100}).then(
      (all) => all.map((c) => c.id)));

  // payments and card errors
  const pi = await steps.call('payment succeeded', () =>
    stripe.paymentIntents.create({
      amount: 2000, currency: 'usd', payment_method: 'pm_card_visa', confirm: true,
      metadata: {ref: 'node-pay-1'},
    }));
  await steps.call('payment declined', () =>
    stripe.paymentIntents.create({
      amount: 100, currency: 'usd', payment_method: 'pm_card_chargeDeclined', confirm: true,
      metadata: {ref: 'node-pay-2'},
    }));
  await steps.call('refund', () =>
    stripe.refunds.create({payment_intent: pi.id, amount: 700}));

  // invalid requests
  await steps.call('missing customer', () => stripe.customers.retrieve('cus_nope'));
  await steps.call('missing currency', () => stripe.paymentIntents.create({amount: 100}));

  // authentication, permission, idempotency
  await steps.call('bad key', () => client(BAD_KEY).balance.retrieve());
  await steps.call('readonly read', () => client(READONLY_KEY).balance.retrieve());
  await steps.call('readonly write', () =>
    client(READONLY_KEY).customers.create({metadata: {ref: 'node-ro'}}));
  const keyed = {idempotencyKey: 'node-parity-key-1'};
  await steps.call('keyed first', () =>
    stripe.customers.create({email: 'once@example.com', metadata: {ref: 'node-idem'}}, keyed));
  await steps.call('keyed replay', () =>
    stripe.customers.create({email: 'once@example.com', metadata: {ref: 'node-idem'}}, keyed));
  await steps.call('keyed mismatch', () =>
    stripe.customers.create({email: 'other@example.com', metadata: {ref: 'node-idem'}}, keyed));

  // files: multipart uploads, sent by stripe-node to the same custom host
  for (const [label, data, name] of [['small', SMALL_FILE, 'evidence.pdf'],
    ['large', LARGE_FILE, 'ledger.csv']]) {
    const file = await steps.call(`file upload ${label}`, () =>
      stripe.files.create({
        purpose: 'dispute_evidence',
        file: {data, name, type: 'application/octet-stream'},
      }));
    const got = await steps.call(`file retrieve ${label}`, () => stripe.files.retrieve(file.id));
    await steps.call(`file contents ${label}`, () => contents(got.url));
  }

  // OAuth (connect address) and a v2 meter event (JSON)
  await steps.call('oauth code', () =>
    stripe.oauth.token({grant_type: 'authorization_code', code: 'ac_nodeparity1'}));
  await steps.call('oauth code reused', () =>
    stripe.oauth.token({grant_type: 'authorization_code', code: 'ac_nodeparity1'}));
  await steps.call('oauth unknown code', () =>
    stripe.oauth.token({grant_type: 'authorization_code', code: 'nope'}));
  await steps.call('meter event', () =>
    stripe.v2.billing.meterEvents.create({
      event_name: 'api_calls', identifier: 'node-evt-1',
      payload: {stripe_customer_id: 'cus_parity', value: '3'},
    }));

  return steps.results();
}

run().then(
  (steps) => {
    process.stdout.write(JSON.stringify({sdk: 'stripe-node', version: Stripe.PACKAGE_VERSION ?? null,
      steps}) + '\n');
  },
  (err) => {
    process.stderr.write(`sdk_check failed: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 1;
  },
);
