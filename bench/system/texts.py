"""The fixed, mixed list of texts the system benchmark speaks, and each one's capped audio length.

Forty English texts of 6 to 250 characters, in a fixed order that mixes short and long, so every run of the bench
sends the same work. Request i of a level speaks `TEXTS[i % len(TEXTS)]`. Each text is already in the form
upstream's `punc_norm` produces (capital first letter, single spaces, final punctuation, no ellipses, colons or
semicolons), so the server speaks exactly these characters and the token cap below is computed on them.

Random weights never emit the stop token, so every request runs to the app's per-chunk cap:
`min(max_new_tokens, ceil(25 * (2 s + max_seconds_per_char * characters)))` speech tokens, 25 tokens a second.
"""
from __future__ import annotations

import math

SPEECH_TOKEN_RATE = 25  # speech tokens per second of audio

TEXTS: tuple[str, ...] = (
    "Hello there.",
    "The quarterly report is due on Friday, so please send me your numbers by Wednesday afternoon.",
    "Ready?",
    "Turn left at the second light, then keep going until you see the old red barn on your right.",
    "Thanks, that helps a lot.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who "
    "repaired every clock in town. Nobody knew where he had learned his craft, and he never spoke of it, not "
    "even to his own children.",
    "Your order has shipped.",
    "Could you repeat the last part, please?",
    "The museum opens at nine in the morning and closes at six in the evening, except on public holidays.",
    "Good morning, everyone.",
    "Our new model reduces latency by half while keeping the same quality, and it runs on a single graphics card "
    "without any changes to the serving code. We will publish the full benchmark results next week, together "
    "with the scripts.",
    "Battery low.",
    "Please hold while I transfer your call to the billing department.",
    "The recipe calls for two cups of flour, one cup of sugar, three eggs and a pinch of salt.",
    "Meeting moved to Thursday.",
    "It was the kind of summer evening when the air smells of cut grass and warm stone, and the whole street "
    "seems to slow down. Children played in the last of the light while their parents talked quietly on the "
    "front steps.",
    "Well done!",
    "Scientists have discovered a new species of frog in the rainforest, smaller than a fingernail.",
    "I will call you back in five minutes.",
    "Traffic on the northbound highway is heavy because of an accident near exit twelve, so expect delays of "
    "about twenty minutes.",
    "Okay then.",
    "The train now arriving at platform four is the express service to the city centre, stopping only at the "
    "airport. Please stand behind the yellow line and let passengers leave the train before you board.",
    "Do you have a reservation?",
    "Remember to water the plants while I am away.",
    "The library will be closed for renovation from the first of June until the end of August.",
    "Welcome back.",
    "When the storm finally passed, the fishermen returned to the harbour to count their boats. Two were "
    "missing, but by morning both crews had been found safe on a small island, tired and cold but unharmed.",
    "Press one for English.",
    "The password must contain at least twelve characters, including a number and a symbol.",
    "Nice to meet you, I am the new assistant for this project.",
    "Hold on.",
    "The committee reviewed all forty applications and selected three finalists, who will present their "
    "proposals to the board next month. The winner will receive funding for two years and a workspace in the "
    "innovation centre.",
    "What time is it in Tokyo right now?",
    "Your appointment with Doctor Lee is confirmed for Tuesday at half past ten.",
    "Got it.",
    "Every great journey begins with a single step, but the hardest part is often deciding where to go.",
    "The weather tomorrow will be mostly sunny, with a light breeze from the west and a high of twenty four "
    "degrees.",
    "See you soon!",
    "Please remember to bring your identification card, the signed consent form and a pen to the exam room, "
    "because the staff cannot lend you any of these on the day. Doors close fifteen minutes before the start.",
    "That sounds like a great plan to me.",
)


def text_for(index: int) -> str:
    """The text of request `index` of a level (the list cycles)."""
    return TEXTS[index % len(TEXTS)]


def capped_tokens(num_chars: int, max_new_tokens: int, max_seconds_per_char: float) -> int:
    """Speech tokens one text chunk may produce: the app's cap (2 s + k s per character, below max_new_tokens)."""
    if max_seconds_per_char <= 0:
        return max_new_tokens
    return min(max_new_tokens, math.ceil(SPEECH_TOKEN_RATE * (2.0 + max_seconds_per_char * num_chars)))


def capped_audio_s(text: str, *, max_new_tokens: int, max_seconds_per_char: float,
                   max_chunk_chars: int) -> float | None:
    """Seconds of audio the capped request makes, or None when the server splits the text into several chunks
    (each capped on its own and crossfaded: not predicted here)."""
    if len(text) > max_chunk_chars:
        return None
    return capped_tokens(len(text), max_new_tokens, max_seconds_per_char) / SPEECH_TOKEN_RATE
