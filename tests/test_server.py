"""The OpenAI SDK against a real ``tessellm serve`` process on a tiny random Llama."""

from __future__ import annotations

import asyncio

import openai
import pytest
from conftest import TEST_PROMPTS

from tessellm import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY_TOKENS = 12
MESSAGES = [
    {"role": "system", "content": "A"},
    {"role": "user", "content": "The quick brown fox"},
]


@pytest.fixture(scope="module")
def client(tiny_server):
    with openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def offline(tiny_llama):
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=8)
    yield llm
    llm.engine.shutdown()


def greedy(client, model, prompt, **kwargs):
    return client.completions.create(
        model=model, prompt=prompt, temperature=0, max_tokens=GREEDY_TOKENS, **kwargs
    )


def test_models_lists_the_served_model(client, tiny_llama):
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_llama)]
    assert models[0].model_extra["max_model_len"] == 512


def test_greedy_completions_equal_llm_generate(client, model_name, offline):
    prompts = TEST_PROMPTS[:4]
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    expected = [o.outputs[0] for o in offline.generate(prompts, params)]
    got = client.completions.create(
        model=model_name,
        prompt=prompts,
        temperature=0,
        max_tokens=GREEDY_TOKENS,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [e.text for e in expected]
    assert all(c.finish_reason == "length" for c in got.choices)
    prompt_tokens = sum(len(offline.get_tokenizer().encode(p)) for p in prompts)
    assert got.usage.prompt_tokens == prompt_tokens
    assert got.usage.completion_tokens == 4 * GREEDY_TOKENS
    assert got.usage.total_tokens == prompt_tokens + 4 * GREEDY_TOKENS


def test_greedy_chat_equals_llm_chat(client, model_name, offline):
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS)
    expected = offline.chat(MESSAGES, params)[0].outputs[0]
    got = client.chat.completions.create(
        model=model_name, messages=MESSAGES, temperature=0, max_completion_tokens=GREEDY_TOKENS
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.usage.completion_tokens == len(expected.token_ids)


def test_token_id_prompt_equals_text_prompt(client, model_name, offline):
    ids = offline.get_tokenizer().encode(TEST_PROMPTS[1])
    by_text = greedy(client, model_name, TEST_PROMPTS[1])
    by_ids = greedy(client, model_name, ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_streamed_completion_equals_unstreamed(client, model_name):
    whole = greedy(client, model_name, TEST_PROMPTS[0]).choices[0]
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=TEST_PROMPTS[0],
            temperature=0,
            max_tokens=GREEDY_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_stream_sends_role_first_and_finish_last(client, model_name):
    whole = client.chat.completions.create(
        model=model_name, messages=MESSAGES, temperature=0, max_tokens=GREEDY_TOKENS
    )
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=MESSAGES,
            temperature=0,
            max_tokens=GREEDY_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_gives_n_choices_and_seed_repeats(client, model_name):
    kwargs = dict(model=model_name, prompt="A", max_tokens=8, temperature=1.0, n=3, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # each choice samples on its own
    assert 3 <= first.usage.completion_tokens <= 3 * 8


def test_chat_n_streaming_covers_every_choice(client, model_name):
    chunks = list(
        client.chat.completions.create(
            model=model_name, messages=MESSAGES, max_tokens=5, n=2, seed=1, stream=True
        )
    )
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(roles) == [0, 1] and sorted(finished) == [0, 1]


def test_stop_string_ends_the_text_before_it(client, model_name):
    full = greedy(client, model_name, TEST_PROMPTS[0], extra_body={"ignore_eos": True})
    words = full.choices[0].text.split()
    stop = " " + words[2]
    expected = full.choices[0].text[: full.choices[0].text.index(stop)]
    for stream in (False, True):
        got = greedy(client, model_name, TEST_PROMPTS[0], stop=[stop], stream=stream)
        if stream:
            chunks = [c for c in got if c.choices]
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0]
        else:
            text, reason = got.choices[0].text, got.choices[0]
        assert text == expected
        assert reason.finish_reason == "stop"


def test_completion_logprobs(client, model_name):
    got = greedy(client, model_name, TEST_PROMPTS[3], logprobs=3).choices[0]
    lp = got.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == GREEDY_TOKENS
    # Each token's text as it reads in the completion (with its word-boundary space): the
    # tokens concatenate to the text, as OpenAI's do.
    assert "".join(lp.tokens) == got.text
    assert [t.strip() for t in lp.tokens] == got.text.split()
    assert lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the top token


def test_chat_logprobs(client, model_name):
    got = client.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    ).choices[0]
    content = got.logprobs.content
    assert "".join(t.token for t in content) == got.message.content
    assert [t.token.strip() for t in content] == got.message.content.split()
    for token in content:
        assert len(token.top_logprobs) == 2
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.bytes == list(token.token.encode())


def test_echo_prepends_the_prompt(client, model_name):
    plain = greedy(client, model_name, TEST_PROMPTS[4]).choices[0].text
    echoed = greedy(client, model_name, TEST_PROMPTS[4], echo=True).choices[0].text
    assert echoed == TEST_PROMPTS[4] + plain


def test_echo_with_logprobs_scores_the_prompt(client, model_name, offline):
    prompt = TEST_PROMPTS[3]
    ids = offline.get_tokenizer().encode(prompt)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=2)
    reference = offline.generate(prompt, params)[0]
    got = client.completions.create(
        model=model_name, prompt=prompt, temperature=0, max_tokens=4, echo=True, logprobs=2
    ).choices[0]
    lp = got.logprobs
    assert got.text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = zip(ids[1:], reference.prompt_logprobs[1:], strict=True)
    expected_prompt = [e[t].logprob for t, e in scored]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected_prompt, abs=1e-4)
    out = reference.outputs[0]
    expected_output = [e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True)]
    assert lp.token_logprobs[len(ids) :] == pytest.approx(expected_output, abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    streamed = client.completions.create(
        model=model_name,
        prompt=prompt,
        temperature=0,
        max_tokens=4,
        echo=True,
        logprobs=2,
        stream=True,
    )
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == got.text
    assert [t for c in chunks for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == lp.text_offset


def test_penalties_change_greedy_output(client, model_name):
    base = greedy(client, model_name, TEST_PROMPTS[0], extra_body={"ignore_eos": True})
    penalised = greedy(
        client,
        model_name,
        TEST_PROMPTS[0],
        frequency_penalty=2.0,
        presence_penalty=2.0,
        extra_body={"ignore_eos": True},
    )
    tokens = base.choices[0].text.split()
    assert len(set(tokens)) < len(tokens)  # the unpenalised text repeats itself
    assert penalised.choices[0].text != base.choices[0].text


def test_max_completion_tokens_limits_the_reply(client, model_name):
    got = client.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        max_completion_tokens=3,
        max_tokens=50,
        extra_body={"ignore_eos": True},
    )
    assert got.usage.completion_tokens == 3
    assert got.choices[0].finish_reason == "length"


def test_async_client_streams_concurrently(tiny_server, model_name, client):
    expected = [greedy(client, model_name, p).choices[0].text for p in TEST_PROMPTS[:3]]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(
            model=model_name, prompt=prompt, temperature=0, max_tokens=GREEDY_TOKENS, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="x") as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in TEST_PROMPTS[:3]))

    assert asyncio.run(main()) == expected
