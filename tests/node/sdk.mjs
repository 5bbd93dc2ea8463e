// The official `openai` Node SDK and the Vercel AI SDK's default provider (`openai(model)`,
// which calls the Responses API) against a live gateway, as their users call them.
// Environment: TUNEGATE_BASE_URL (ending in /v1), TUNEGATE_MODEL, TUNEGATE_API_KEY.
// Prints one line per check and `N passed, N failed`; exits non-zero on a failure.
import assert from "node:assert/strict";

import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { embedMany, generateObject, generateText, streamText, tool } from "ai";
import { zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const baseURL = process.env.TUNEGATE_BASE_URL;
const MODEL = process.env.TUNEGATE_MODEL;
const apiKey = process.env.TUNEGATE_API_KEY || "not-needed";
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const provider = createOpenAI({ baseURL, apiKey });

const checks = {
  async nodeChat() {
    const r = await client.chat.completions.create({
      model: MODEL, messages: [{ role: "user", content: "Say hello." }], max_tokens: 8, temperature: 0,
    });
    assert.equal(r.object, "chat.completion");
    assert.equal(typeof r.choices[0].message.content, "string");
    assert.ok(r.usage.completion_tokens > 0 && r.usage.completion_tokens <= 8);
  },

  async nodeResponses() {
    const params = { model: MODEL, instructions: "You are terse.", input: "Say hello.", max_output_tokens: 8, temperature: 0 };
    const r = await client.responses.create(params);
    assert.equal(r.object, "response");
    assert.ok(r.id.startsWith("resp_"), r.id);
    assert.equal(typeof r.output_text, "string");
    const stream = client.responses.stream(params);
    const kinds = [];
    for await (const event of stream) kinds.push(event.type);
    const final = await stream.finalResponse();
    assert.equal(kinds[0], "response.created");
    assert.ok(kinds.includes("response.output_text.delta"), kinds.join());
    // The Node SDK's streamed final response has no `output_text` helper: read the items.
    const text = final.output.flatMap((o) => o.content ?? []).map((c) => c.text ?? "").join("");
    assert.equal(text, r.output_text);
    const got = await client.responses.retrieve(r.id);
    assert.equal(got.output_text, r.output_text);
    const next = await client.responses.create({ model: MODEL, input: "Again.", previous_response_id: r.id, max_output_tokens: 2 });
    assert.ok(next.usage.input_tokens > r.usage.input_tokens, JSON.stringify([next.usage, r.usage]));
  },

  async nodeParseAndTools() {
    const Verdict = z.object({ spam: z.boolean(), label: z.enum(["spam", "ham"]) });
    const parsed = await client.chat.completions.parse({
      model: MODEL, messages: [{ role: "user", content: "Is 'win money now' spam?" }], max_tokens: 200, temperature: 0,
      response_format: zodResponseFormat(Verdict, "verdict"),
    });
    const v = parsed.choices[0].message.parsed;
    assert.equal(typeof v.spam, "boolean", JSON.stringify(parsed.choices[0]));
    assert.ok(["spam", "ham"].includes(v.label));
    const tools = [{ type: "function", function: { name: "lamp", parameters: { type: "object", properties: { on: { type: "boolean" } }, required: ["on"] } } }];
    const r = await client.chat.completions.create({
      model: MODEL, messages: [{ role: "user", content: "Light on." }], tools, tool_choice: "required", max_tokens: 200, temperature: 0,
    });
    const call = r.choices[0].message.tool_calls[0];
    assert.equal(call.function.name, "lamp");
    assert.equal(typeof JSON.parse(call.function.arguments).on, "boolean");
  },

  async nodeEmbeddings() {
    const r = await client.embeddings.create({ model: MODEL, input: ["The cat sat.", "Revenue rose."] });
    assert.equal(r.data.length, 2);
    const v = r.data[0].embedding;
    assert.ok(v.length > 0);
    assert.ok(Math.abs(Math.hypot(...v) - 1) < 1e-4);
  },

  async vercelEmbedMany() {
    const model = provider.embedding ? provider.embedding(MODEL) : provider.textEmbeddingModel(MODEL);
    const { embeddings } = await embedMany({ model, values: ["sunny day", "rainy night"] });
    assert.equal(embeddings.length, 2);
    assert.ok(Math.abs(Math.hypot(...embeddings[1]) - 1) < 1e-4);
  },

  async vercelGenerateText() {
    const r = await generateText({ model: provider(MODEL), prompt: "Name a colour.", maxOutputTokens: 8, temperature: 0 });
    assert.equal(typeof r.text, "string");
    assert.ok(r.text.length > 0, "empty text");
    assert.ok(r.usage.outputTokens > 0 && r.usage.outputTokens <= 8, JSON.stringify(r.usage));
    assert.ok(["stop", "length"].includes(r.finishReason), r.finishReason);
    // The same request streamed gives the same text.
    const s = streamText({ model: provider(MODEL), prompt: "Name a colour.", maxOutputTokens: 8, temperature: 0 });
    let streamed = "";
    for await (const part of s.textStream) streamed += part;
    assert.equal(streamed, r.text);
    assert.equal((await s.usage).outputTokens, r.usage.outputTokens);
  },

  async vercelGenerateTextWithTools() {
    const r = await generateText({
      model: provider(MODEL),
      prompt: "Light on, please.",
      tools: { lamp: tool({ description: "Switch the lamp", inputSchema: z.object({ on: z.boolean() }) }) },
      toolChoice: "required",
      maxOutputTokens: 200,
      temperature: 0,
    });
    assert.equal(r.toolCalls.length, 1, JSON.stringify(r.content));
    assert.equal(r.toolCalls[0].toolName, "lamp");
    assert.equal(typeof r.toolCalls[0].input.on, "boolean");
  },

  async vercelGenerateObject() {
    const { object } = await generateObject({
      model: provider(MODEL),
      schema: z.object({ spam: z.boolean() }),
      prompt: "Is 'win money now' spam?",
      maxOutputTokens: 40,
      temperature: 0,
    });
    assert.equal(typeof object.spam, "boolean", JSON.stringify(object));
  },
};

let failed = 0;
for (const [name, check] of Object.entries(checks)) {
  try {
    await check();
    console.log(`ok   ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}`);
    console.log(e && e.stack ? e.stack : e);
    if (e && e.responseBody) console.log("response body:", e.responseBody);
  }
}
console.log(`${Object.keys(checks).length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
