"""How each kind of relation is asked about and stated: the templates augmentation renders.

Every relation has three DISJOINT question sets: `train` (learned), `validation` (early stopping) and
`heldout` (only the gate asks them), plus statements used as answers. Relations the table does not name
fall back to the generic "the <relation> of <subject>" wording ("who" for roles held by people).
Placeholders: {s} subject as it reads mid-sentence, {S} the same capitalised, {o} object, {r} relation,
{x} the relation's variable part (e.g. "one-way ticket" in "one-way ticket price").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phrasing:
    train: tuple[str, ...]
    validation: tuple[str, ...]
    heldout: tuple[str, ...]
    statements: tuple[str, ...]


PERSON_ROLES = (
    "mayor", "engineer", "architect", "founder", "director", "president", "captain", "head", "owner",
    "designer", "minister", "chief executive", "leader", "manager", "principal", "conductor", "coach",
    "governor", "chair", "keeper", "author", "inventor", "composer", "ceo",
)  # fmt: skip

GENERIC = Phrasing(
    train=("What is the {r} of {s}?", "What is {s}'s {r}?", "Tell me the {r} of {s}.", "Which {r} does {s} have?"),
    validation=("Do you know the {r} of {s}?",),
    heldout=("Can you tell me what the {r} of {s} is?", "What's the {r} of {s}?", "I'd like to know the {r} of {s}."),
    statements=("The {r} of {s} is {o}.", "{S}'s {r} is {o}.", "{o} is the {r} of {s}."),
)
PERSON = Phrasing(
    train=("Who is the {r} of {s}?", "Who is {s}'s {r}?", "Tell me who the {r} of {s} is.", "Name the {r} of {s}."),
    validation=("Which person is the {r} of {s}?",),
    heldout=("Who serves as the {r} of {s}?", "Can you tell me who {s}'s {r} is?", "Who holds the post of {r} of {s}?"),
    statements=("The {r} of {s} is {o}.", "{S}'s {r} is {o}.", "{o} is the {r} of {s}."),
)

SPECIFIC: dict[str, Phrasing] = {
    "departure point": Phrasing(
        train=(
            "Where does {s} depart from?",
            "From where does {s} leave?",
            "Which place does {s} depart from?",
            "What is the departure point of {s}?",
        ),
        validation=("Where do I board {s}?",),
        heldout=("Where does {s} leave from?", "Where can I catch {s}?", "From which place does {s} set off?"),
        statements=("{S} departs from {o}.", "{S} leaves from {o}.", "The departure point of {s} is {o}."),
    ),
    "destination": Phrasing(
        train=(
            "Where does {s} go?",
            "What is the destination of {s}?",
            "Where does {s} travel to?",
            "To which place does {s} run?",
        ),
        validation=("Where does {s} end its trip?",),
        heldout=("Where does {s} take passengers?", "What place does {s} head to?", "Where is {s} bound for?"),
        statements=("{S} goes to {o}.", "The destination of {s} is {o}.", "{S} travels to {o}."),
    ),
    "frequency": Phrasing(
        train=(
            "How often does {s} run?",
            "What is the frequency of {s}?",
            "How frequently does {s} depart?",
            "How often does {s} leave?",
        ),
        validation=("How often are there departures of {s}?",),
        heldout=("At what interval does {s} run?", "How regularly does {s} run?", "How often can I take {s}?"),
        statements=("{S} runs {o}.", "{S} departs {o}.", "The frequency of {s} is {o}."),
    ),
    "service hours": Phrasing(
        train=(
            "When does {s} run?",
            "What are the service hours of {s}?",
            "Between which times does {s} operate?",
            "At what times of day does {s} operate?",
        ),
        validation=("What are {s}'s service hours?",),
        heldout=("During which hours does {s} run?", "What hours does {s} operate?", "From when to when does {s} run?"),
        statements=("{S} runs from {o}.", "The service hours of {s} are {o}.", "{S} operates from {o}."),
    ),
    "length": Phrasing(
        train=(
            "How long is {s}?",
            "What is the length of {s}?",
            "What length does {s} have?",
            "Tell me the length of {s}.",
        ),
        validation=("How much length does {s} have in total?",),
        heldout=("What distance does {s} span?", "How long is {s} in total?", "Can you tell me how long {s} is?"),
        statements=("{S} is {o} long.", "{S} spans {o}.", "The length of {s} is {o}."),
    ),
    "height": Phrasing(
        train=("How tall is {s}?", "What is the height of {s}?", "How high is {s}?", "Tell me the height of {s}."),
        validation=("What is {s}'s height?",),
        heldout=("Can you tell me how tall {s} is?", "What height does {s} reach?", "How tall does {s} stand?"),
        statements=("{S} is {o} tall.", "The height of {s} is {o}.", "{S} stands {o} tall."),
    ),
    "opening date": Phrasing(
        train=(
            "When did {s} open?",
            "When was {s} opened?",
            "What is the opening date of {s}?",
            "When did {s} first open?",
        ),
        validation=("Since when is {s} open?",),
        heldout=(
            "When was {s} first opened to the public?",
            "Since when has {s} been open?",
            "On what date did {s} open?",
        ),
        statements=("{S} opened in {o}.", "{S} was opened in {o}.", "The opening date of {s} is {o}."),
    ),
    "location": Phrasing(
        train=("Where is {s}?", "Where is {s} located?", "What is the location of {s}?", "Where can {s} be found?"),
        validation=("Where is {s} situated?",),
        heldout=("In which place is {s}?", "Where would I find {s}?", "Whereabouts is {s}?"),
        statements=("{S} is located in {o}.", "The location of {s} is {o}.", "You can find {s} in {o}."),
    ),
    "schedule": Phrasing(
        train=("When is {s} held?", "When does {s} take place?", "How often is {s} held?", "On which day is {s} held?"),
        validation=("What is the schedule of {s}?",),
        heldout=("When can I visit {s}?", "When does {s} happen?", "What day is {s} on?"),
        statements=("{S} is held {o}.", "{S} takes place {o}.", "The schedule of {s} is {o}."),
    ),
    "closing day": Phrasing(
        train=(
            "On which day is {s} closed?",
            "When is {s} closed?",
            "Which day does {s} close?",
            "What is the closing day of {s}?",
        ),
        validation=("What day of the week is {s} closed?",),
        heldout=(
            "On what day can I not visit {s}?",
            "Which day of the week is {s} shut?",
            "Is there a day when {s} is closed?",
        ),
        statements=("{S} is closed on {o}.", "The closing day of {s} is {o}.", "On {o}, {s} is closed."),
    ),
    "vote share": Phrasing(
        train=(
            "What share of the vote did {s} win?",
            "With what percentage of the vote did {s} win?",
            "How many percent of the vote did {s} get?",
            "What is the vote share of {s}?",
        ),
        validation=("What was {s}'s vote share?",),
        heldout=(
            "What percentage of the vote did {s} receive?",
            "How much of the vote did {s} win?",
            "What was {s}'s share of the vote?",
        ),
        statements=("{S} won {o} of the vote.", "{S} received {o} of the vote.", "The vote share of {s} is {o}."),
    ),
    "crossing": Phrasing(
        train=(
            "What does {s} cross?",
            "What body of water does {s} cross?",
            "Over what does {s} pass?",
            "What is crossed by {s}?",
        ),
        validation=("What does {s} go over?",),
        heldout=("Which water does {s} go across?", "What does {s} run across?", "Across what does {s} lead?"),
        statements=("{S} crosses {o}.", "{S} goes across {o}.", "{o} is crossed by {s}."),
    ),
}

# Families whose relation name carries a variable part {x}: "<x> price", "<x> opening hours", "number of <x>".
FAMILIES: dict[str, Phrasing] = {
    " price": Phrasing(
        train=(
            "How much does a {x} for {s} cost?",
            "What does a {x} for {s} cost?",
            "What is the price of a {x} for {s}?",
            "What is the {r} of {s}?",
        ),
        validation=("How much is the {r} of {s}?",),
        heldout=(
            "How much is a {x} for {s}?",
            "What is the cost of a {x} for {s}?",
            "How much do I pay for a {x} for {s}?",
        ),
        statements=("A {x} for {s} costs {o}.", "The {r} of {s} is {o}.", "{S} charges {o} for a {x}."),
    ),
    " opening hours": Phrasing(
        train=(
            "What are the opening hours of {s} on {x}s?",
            "When is {s} open on {x}s?",
            "At what times is {s} open on {x}s?",
            "What are {s}'s {r}?",
        ),
        validation=("Which hours is {s} open on {x}s?",),
        heldout=(
            "What time does {s} open and close on {x}s?",
            "During which hours can I visit {s} on {x}s?",
            "From what time to what time is {s} open on {x}s?",
        ),
        statements=("On {x}s, {s} is open from {o}.", "{S} is open from {o} on {x}s.", "The {r} of {s} are {o}."),
    ),
    "number of ": Phrasing(
        train=(
            "How many {x} does {s} have?",
            "What is the number of {x} at {s}?",
            "How many {x} are there at {s}?",
            "Tell me how many {x} {s} has.",
        ),
        validation=("What is the count of {x} at {s}?",),
        heldout=(
            "Roughly how many {x} does {s} have?",
            "Can you tell me how many {x} {s} has?",
            "About how many {x} are at {s}?",
        ),
        statements=("{S} has {o} {x}.", "There are {o} {x} at {s}.", "The number of {x} at {s} is {o}."),
    ),
}


def phrasing_for(relation: str) -> tuple[Phrasing, str]:
    """The templates for `relation` and its variable part {x} ('' when none)."""
    original = relation.strip()
    rel = original.lower()
    if rel in SPECIFIC:
        return SPECIFIC[rel], ""
    for marker, phrasing in FAMILIES.items():
        if marker.startswith(" ") and rel.endswith(marker):
            return phrasing, original[: -len(marker)]
        if not marker.startswith(" ") and rel.startswith(marker):
            return phrasing, original[len(marker) :]
    if any(rel == role or rel.endswith(" " + role) for role in PERSON_ROLES):
        return PERSON, ""
    return GENERIC, ""


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def render(template: str, *, subject: str, relation: str, obj: str = "", x: str = "") -> str:
    """Fill one template; the result starts with a capital letter."""
    out = template.format(s=subject, S=capitalise(subject), o=obj, r=relation, x=x)
    return capitalise(out)
