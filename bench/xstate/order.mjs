// The order-processing machine of shared/examples/order-processing.yaml in XState v5, driven by
// its pure `transition` function (no actors, no I/O), with the same event sequence as cnsm's
// engine benchmark: complete, pay (guarded, assigns paidAmount), ship, deliver.
// Run: node order.mjs [n_orders]   (prints transitions/s)
import { createMachine, assign, initialTransition, transition } from 'xstate';

const order = createMachine({
  id: 'order-processing',
  initial: 'created',
  context: { total: 40 },
  states: {
    created: {
      after: { 30000: 'cancelled' },
      on: { complete: 'validated', cancel: 'cancelled' },
    },
    validated: {
      after: { 900000: 'cancelled' },
      on: {
        pay: {
          target: 'paid',
          guard: ({ context, event }) => event.amount >= context.total,
          actions: assign({ paidAmount: ({ event }) => event.amount }),
        },
        cancel: 'cancelled',
      },
    },
    paid: { after: { 604800000: 'refunded' }, on: { ship: 'shipped', refund: 'refunded' } },
    shipped: { after: { 1209600000: 'delivered' }, on: { deliver: 'delivered', refund: 'refunded' } },
    delivered: { type: 'final' },
    refunded: { type: 'final' },
    cancelled: { type: 'final' },
  },
});

const events = [{ type: 'complete' }, { type: 'pay', amount: 40 }, { type: 'ship' }, { type: 'deliver' }];

function run(nOrders) {
  const [start] = initialTransition(order);
  const t0 = process.hrtime.bigint();
  let n = 0;
  for (let i = 0; i < nOrders; i++) {
    let snapshot = start;
    for (const event of events) {
      [snapshot] = transition(order, snapshot, event);
      n++;
    }
    if (snapshot.value !== 'delivered') throw new Error(`unexpected state ${snapshot.value}`);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return n / seconds;
}

const nOrders = Number(process.argv[2] || 50000);
run(5000); // warm-up (JIT)
let best = 0;
for (let round = 0; round < 3; round++) best = Math.max(best, run(nOrders));
console.log(`bench xstate.transition.order_processing: ${best.toFixed(1)} transitions/s (xstate 5.33.3, node ${process.version})`);
