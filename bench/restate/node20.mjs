// The Restate SDK calls Promise.withResolvers (ES2024, Node.js >= 22); this machine has Node.js
// 20. The standard definition, installed only where missing, before the SDK is loaded.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers() {
    let resolve;
    let reject;
    const promise = new this((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}
