// The OpenAI JavaScript client, used as its README shows, against Switchyard.
// Usage: node chat.mjs <base url> <api key>; prints {"streamed": text, "whole": text} as JSON.
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey });
const messages = [{ role: "user", content: "Say something about trains." }];

const stream = await client.chat.completions.create({ model: "tgi", messages, stream: true, max_tokens: 12, temperature: 0 });
let streamed = "";
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.delta?.content || "";
}
const whole = await client.chat.completions.create({ model: "tgi", messages, max_tokens: 12, temperature: 0 });
console.log(JSON.stringify({ streamed, whole: whole.choices[0].message.content }));
