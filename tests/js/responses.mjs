// The OpenAI JavaScript client's Responses API against Switchyard.
// Usage: node responses.mjs <base url> <api key>; prints {"streamed", "whole", "events", "status"} as JSON.
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey });
const request = { model: "tgi", input: "Say something about trains.", max_output_tokens: 12, temperature: 0 };

const whole = await client.responses.create(request);
const stream = await client.responses.create({ ...request, stream: true });
let streamed = "";
const events = [];
for await (const event of stream) {
  events.push(event.type);
  if (event.type === "response.output_text.delta") streamed += event.delta;
}
console.log(JSON.stringify({ streamed, whole: whole.output_text, events, status: whole.status }));
