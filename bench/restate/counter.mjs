// The counter workload of cnsm's http_load bench as a Restate virtual object, keyed by instance
// id. `create` sets the initial state; `event` applies one event the way cnsm's counter machine
// does (state `counting`, `inc` loops on it and adds 1 to n, version + 1) and returns the new
// state. Restate journals the invocation and the state change in its log and answers the ingress
// call once the invocation's completion is committed there (fsync'd by its log server).
// Run: node counter.mjs [port]   (0 or none: any free port; prints `listening on PORT`)
import './node20.mjs'; // before the SDK: Promise.withResolvers on Node.js 20
import * as http2 from 'node:http2';
import * as restate from '@restatedev/restate-sdk';
import { createEndpointHandler } from '@restatedev/restate-sdk/node';

const INITIAL = 'counting';
const TRANSITIONS = { counting: { inc: 'counting' } };

const counter = restate.object({
  name: 'Counter',
  handlers: {
    create: async (ctx) => {
      if ((await ctx.get('instance')) !== null) {
        throw new restate.TerminalError(`instance ${ctx.key} exists`, { errorCode: 409 });
      }
      const instance = { state: INITIAL, n: 0, version: 1 };
      ctx.set('instance', instance);
      return instance;
    },
    event: async (ctx, body) => {
      const event = body?.event;
      if (typeof event !== 'string') {
        throw new restate.TerminalError('body must be {"event": NAME}', { errorCode: 400 });
      }
      const current = await ctx.get('instance');
      if (current === null) {
        throw new restate.TerminalError(`instance ${ctx.key} not found`, { errorCode: 404 });
      }
      const target = TRANSITIONS[current.state]?.[event];
      if (target === undefined) {
        throw new restate.TerminalError(`no transition for ${event} in state ${current.state}`, {
          errorCode: 422,
        });
      }
      const next = { state: target, n: current.n + 1, version: current.version + 1 };
      ctx.set('instance', next);
      return next;
    },
  },
});

const server = http2.createServer(createEndpointHandler({ services: [counter] }));
server.listen(Number(process.argv[2] ?? 0), '127.0.0.1', () => {
  console.log(`listening on ${server.address().port}`);
});
// Exit at once on a signal: open HTTP/2 sessions from restate-server would hold `close` open.
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
