"""LangChain's OpenAI integration against the gateway, as a RAG app and a chat app use it:
`OpenAIEmbeddings` (documents and a query), `ChatOpenAI` on chat completions and on the
Responses API (`use_responses_api=True`), invoked and streamed.

Environment as for test_openai_sdk.py. Prints one line per check and `N passed, N failed`.
"""

import math
import os

import checks

from langchain_openai import ChatOpenAI, OpenAIEmbeddings

BASE_URL = os.environ["TUNEGATE_BASE_URL"]
MODEL = os.environ["TUNEGATE_MODEL"]
KEY = os.environ.get("TUNEGATE_API_KEY") or "not-needed"


def check_embeddings():
    # `check_embedding_ctx_length=False`: LangChain otherwise splits texts with tiktoken's
    # OpenAI encodings (downloaded on first use, and meaningless for this model's tokenizer).
    emb = OpenAIEmbeddings(model=MODEL, base_url=BASE_URL, api_key=KEY, check_embedding_ctx_length=False)
    docs = emb.embed_documents(["The cat sat on the mat.", "Revenue rose by four percent.", "A dog slept."])
    assert len(docs) == 3 and len({len(d) for d in docs}) == 1 and len(docs[0]) > 0, [len(d) for d in docs]
    for d in docs:
        assert abs(math.sqrt(sum(x * x for x in d)) - 1.0) < 1e-4
    query = emb.embed_query("The cat sat on the mat.")
    assert max(abs(a - b) for a, b in zip(query, docs[0])) < 1e-4, "a text embeds the same alone or in a batch"


def check_chat_and_responses():
    for responses in (False, True):
        llm = ChatOpenAI(model=MODEL, base_url=BASE_URL, api_key=KEY, max_tokens=8, temperature=0,
                         use_responses_api=responses, max_retries=0)
        msg = llm.invoke([("system", "You are terse."), ("user", "Say hello.")])
        assert isinstance(msg.text, str), msg
        usage = msg.usage_metadata
        assert usage and 0 < usage["output_tokens"] <= 8, usage
        streamed = "".join(chunk.text for chunk in llm.stream([("system", "You are terse."), ("user", "Say hello.")]))
        assert streamed == msg.text, (responses, streamed, msg.text)


def main():
    checks.run(globals())


if __name__ == "__main__":
    main()
