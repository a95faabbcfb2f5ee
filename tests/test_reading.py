"""The reading step without a model: sentence splitting, which passages the model reads, the quote."""

from __future__ import annotations

import numpy as np

from kfresh import prompt
from kfresh.core.config import AnswerConfig
from kfresh.core.text import content_words, names, split_sentences
from kfresh.indexer.documents import Hit
from kfresh.server.reading import (
    asked,
    coverage,
    format_quote,
    is_refusal,
    pick_quote,
    quote_candidates,
    rerank,
    shown_passages,
)


def _hit(doc_id: str, text: str, *, score: float, valid_from: float = 0.0) -> Hit:
    return Hit(
        doc_id=doc_id,
        version=1,
        chunk_id=0,
        ordinal=0,
        text=text,
        score=score,
        source="",
        valid_from=valid_from,
        metadata={},
    )


def test_sentences_split_at_stops_but_not_inside_abbreviations() -> None:
    text = 'The U.S. Senate voted on Tuesday.  It passed 52-48! Officials said "It is done." 3 people objected.'
    assert split_sentences(text) == ["The U.S. Senate voted on Tuesday.", "It passed 52-48!", 'Officials said "It is done."',
                                     "3 people objected."]  # fmt: skip


def test_tiny_pieces_join_a_neighbour_and_empty_text_has_none() -> None:
    assert split_sentences("Yes. The ferry leaves from Pier 7 at noon.") == [
        "Yes. The ferry leaves from Pier 7 at noon."
    ]
    assert split_sentences("   ") == []
    assert split_sentences("no stop at the end") == ["no stop at the end"]


def test_the_model_reads_the_best_passages_in_display_order() -> None:
    old, best, newer = _hit("a", "x", score=0.5), _hit("b", "y", score=0.9), _hit("c", "z", score=0.7)
    kept = [old, best, newer]  # oldest first, as conflict resolution returns them
    assert shown_passages(kept, 1) == [best]
    assert shown_passages(kept, 2) == [best, newer]
    assert shown_passages(kept, 0) == kept and shown_passages(kept, 5) == kept


def test_content_words_drop_function_words_and_possessives() -> None:
    assert content_words("What is Biden's plan for the Gaza ceasefire this week?") == {
        "biden",
        "plan",
        "gaza",
        "ceasefire",
    }
    assert content_words("Who was it?") == set()


def test_coverage_weights_the_word_that_tells_neighbours_apart() -> None:
    question = "Which bakery chain is Peltry Foods buying?"
    pool = [
        "Harbor Foods is buying a dairy in Avel.",  # shares the common word only
        "Peltry Foods agreed to buy the bakery chain Crumbhouse.",  # names the company the question names
        "Foods prices rose in March.",
    ]
    cov = coverage(question, pool)
    assert cov[1] > cov[0] > 0 and cov[1] > cov[2]
    assert min(cov) >= 0 and max(cov) <= 1
    assert coverage("Who was it?", pool) == [0.0, 0.0, 0.0]  # nothing to cover: the embedder's order stands
    assert coverage(question, []) == []


def test_rerank_lifts_the_passage_naming_the_question_over_a_close_cosine() -> None:
    near = _hit("near", "Harbor Foods is buying a dairy in Avel.", score=0.62)
    named = _hit("named", "Peltry Foods agreed to buy the bakery chain Crumbhouse.", score=0.58)
    far = _hit("far", "Peltry Foods was founded in 1901.", score=0.10)
    question = "Which bakery chain is Peltry Foods buying?"
    ranked = rerank(question, [near, named, far], 0.3)
    assert [h.doc_id for h, _ in ranked][:2] == ["named", "near"]
    assert ranked[0][1] > named.score  # the reading score, not the cosine, orders them
    assert named.score == 0.58  # the hit keeps its cosine (citations report it)
    assert [h.doc_id for h, _ in rerank(question, [near, named, far], 0.0)] == ["near", "named", "far"]
    # shown_passages reads by the reading score when given one
    reading_score = {id(h): s for h, s in ranked}
    assert shown_passages([near, named], 1, lambda h: reading_score[id(h)]) == [named]
    assert shown_passages([near, named], 1) == [near]


def test_the_quote_is_the_sentence_closest_to_the_question() -> None:
    passages = [
        _hit("a", "The museum opens at nine. It keeps 40 lamps.", score=0.8),
        _hit("b", "Lamps are old.", score=0.7),
    ]
    candidates = quote_candidates(passages)
    assert candidates == [(1, "The museum opens at nine."), (1, "It keeps 40 lamps."), (2, "Lamps are old.")]
    vectors = np.eye(3, dtype=np.float32)
    assert pick_quote(np.array([0.1, 0.9, 0.2], dtype=np.float32), candidates, vectors) == (1, "It keeps 40 lamps.")
    assert pick_quote(np.array([0.0, 0.5, 0.5], dtype=np.float32), candidates, vectors) == (
        2,
        "Lamps are old.",
    )  # tie: later passage
    assert pick_quote(np.zeros(3, dtype=np.float32), [], np.zeros((0, 3), dtype=np.float32)) is None


def test_the_models_own_not_in_the_documents_reply_is_recognised() -> None:
    assert is_refusal("I could not find this in the documents.")
    assert is_refusal("  I could not find this in the\ndocuments")  # as streamed, cut short
    assert not is_refusal("Mara Quell won. I could not find this in the documents.")
    assert not is_refusal("I could not find the ferry, but the pier is open.")


def test_a_quote_the_answer_already_holds_is_not_repeated() -> None:
    assert format_quote(1, "It keeps 40 lamps.", "The museum: it keeps  40 lamps.") == ""
    assert format_quote(2, "It keeps 40 lamps.", "Forty.") == '\n\n[2] "It keeps 40 lamps."'
    assert format_quote(1, "It keeps 40 lamps.", "  ") == '[1] "It keeps 40 lamps."'  # the model said nothing


def test_prompt_formats_put_question_and_passages_where_they_say() -> None:
    hits = [_hit("a", "The tower is 812 metres tall.", score=0.9)]
    sandwich = prompt.build_messages("How tall?", hits, style="sandwich")
    user = sandwich[-1]["content"]
    assert (
        sandwich[-1]["role"] == "user"
        and user.startswith("Question: How tall?")
        and user.endswith("answer briefly: How tall?")
    )
    assert user.index("812") > user.index("Question:") and "812" not in sandwich[0]["content"]
    only_after = prompt.build_messages("How tall?", hits, style="user")[-1]["content"]
    assert only_after.startswith("Passages") and only_after.count("How tall?") == 1
    system = prompt.build_messages("How tall?", hits, style="system")
    assert "812" in system[0]["content"] and system[-1]["content"] == "How tall?"


def test_the_finetuner_trains_on_the_served_prompt_format() -> None:
    assert AnswerConfig().prompt_format == prompt.DEFAULT_FORMAT


def test_names_are_capitalised_words_without_calendar_or_function_words() -> None:
    text = "On Monday, Halvorne Shipping's board met in May at the U.S. office of AI firm Brindlewood."
    assert names(text) == {"halvorne", "shipping", "brindlewood"}
    assert names("The Dallowmere council rescinded the Family Car of the Year honor.") == {
        "dallowmere",
        "family",
        "car",
    }


def test_asked_names_are_the_question_names_few_passages_of_the_pool_hold() -> None:
    pool = [
        "Trump said Halvorne Shipping named Priya Castellane its chief executive.",
        "Trump said the board of Halvorne picked Anselm Brooke.",
        "Trump spoke about tariffs.",
        "A shipping strike closed the port.",  # lower-case "shipping" is not a name here
    ]
    named = asked("Who did Trump say runs Halvorne Shipping?", pool).names
    assert named == frozenset({"halvorne", "shipping"})  # "trump" is in three passages: it tells none apart
    assert asked("Who runs the port?", pool).names == frozenset()
