"""What did the doctor just say? Rule-based understanding of one doctor turn.

Built to survive a tiny policy's messy text: no parsing, only cue patterns
per sentence. Recognises questions by topic (symptoms, history, medications,
social, family, ...), requests to examine ("let me listen to your chest"),
test orders ("we'll do a blood test / CT"), diagnosis statements, treatment
plans, closings, and attempts to extract the diagnosis or results.

    intent = understand("I'd like to listen to your chest. Any fever?")
    intent.exam_targets -> ("chest",) ; intent.topics -> {"symptoms"}
"""
from __future__ import annotations

import re

import msgspec

from verimed.core.simulator.text import STOPWORDS, content_stems, sentences, stem

# Topic cue stems -> fact kinds a question on that topic may be answered from.
TOPIC_KINDS: dict[str, tuple[str, ...]] = {
    "complaint": ("chief_complaint", "symptom_primary", "hpi"),
    "course": ("hpi", "symptom_primary", "chief_complaint"),
    "symptoms": ("symptom_secondary", "review_of_systems", "hpi", "symptom_primary"),
    "past": ("past_history", "other_history"),
    "medications": ("other_history", "past_history", "hpi"),
    "social": ("social_history", "other_history"),
    "family": ("other_history", "past_history", "social_history"),
    "demographics": ("demographics",),
}
_TOPIC_CUES: dict[str, tuple[str, ...]] = {
    "complaint": (r"brings? you", r"bring you", r"what('s| is) (wrong|going on|the (problem|matter|issue))",
                  r"how can i help", r"what seems", r"complaint", r"come in (for|today)", r"\bproblem\b",
                  r"what happened", r"trouble", r"\bhelp\b", r"bother", r"\bissue\b", r"main thing",
                  r"worrying you", r"what can i do for you", r"what'?s up\b", r"\breason", r"\bvisit\b", r"appointment",
                  r"(came|come) (in|to see)", r"here for", r"brought you", r"made you", r"why did you come",
                  r"why (are|you're|you are) here"),
    "course": (r"\bwhen\b", r"\bstart", r"\bbegan\b", r"\bbegin", r"how long", r"\bsince\b", r"\bworse", r"\bbetter\b",
               r"tell me (more|about)", r"describe", r"\bonset\b", r"how often", r"\bsevere", r"what makes",
               r"\bhistory of (the|this|your) (present|current)", r"\bwen\b", r"sudden", r"gradual", r"how quickly",
               r"come on\b", r"came on\b", r"feeling unwell", r"timeline", r"how many (days|weeks)", r"staying the same",
               r"\bconstant", r"come and go", r"got worse"),
    "symptoms": (r"symptom", r"anything else", r"\bother\b", r"\bfeel", r"\bnotice", r"\bpain\b", r"\bhurt",
                 r"experienc", r"\bchange", r"otherwise", r"unusual", r"complaints", r"in general", r"besides",
                 r"apart from"),
    "past": (r"medical history", r"past (medical|history|illness)", r"(health|medical) (problem|condition|issue)s?",
             r"\bconditions?\b", r"illness", r"surger", r"operation", r"hospital", r"diagnosed with", r"chronic",
             r"pregnan", r"vaccin", r"allerg", r"seriously ill", r"\bill\b", r"\bhx\b", r"admission",
             r"diagnosed with anything", r"had this before", r"previous"),
    "medications": (r"\bmedicat", r"\bmedicine", r"\bmeds\b", r"\bpills?\b", r"prescri", r"\btaking\b", r"supplement", r"allerg",
                    r"\bdrugs? (do|are) you"),
    "social": (r"\bsmok", r"tobacco", r"cigar", r"alcohol", r"\bdrink", r"\bdrugs?\b", r"\bwork\b", r"\bjob\b",
               r"occupation", r"\blive\b", r"\bliving\b", r"married", r"\bsex", r"partner", r"travel", r"exercise",
               r"\bdiet\b", r"\beat\b", r"social", r"lifestyle", r"school", r"\bpets?\b", r"home",
               r"what do you do\b", r"for a living"),
    "family": (r"family", r"mother", r"father", r"\bparents?\b", r"sibling", r"brother", r"sister",
               r"relative", r"runs? in", r"inherit"),
    "demographics": (r"how old", r"\byour age\b", r"\bage\b"),
}

# First-person action markers: "let me", "I'll", "we're going to", "can I" ...
_ACTION = (r"\b(?:let me|let's|let us|lets|allow me|i(?:'ll| will| would like to|'d like to| want to| am going to|'m going to|"
           r" need to| have to| must| shall| should| can| could| may)|we(?:'ll| will| should| need to| are going to|"
           r"'re going to| can| could| must| shall)|i'm gonna|going to|(?:can|may|could) i)\b")
# A polite imperative ("please get a CT", "now lie back"): only at the start of a sentence, never inside a question.
_POLITE_ORDER = r"^(?:(?:ok(?:ay)?|right|alright|now|so)[, ]+)?(?:please|now)\b"
_EXAM_IMPERATIVE = (r"(take a deep breath|breathe in|lie (down|back)|open your mouth|say ah|follow my finger|squeeze my|"
                    r"while i (examine|listen|check|look|feel|press)|i('m| am) (now )?(examining|listening|checking|"
                    r"looking at|feeling|pressing|palpating))")
_EXAM_VERBS = (r"(examin\w*|exam\b|listen|auscultat\w*|check\w*|take|look|palpat\w*|feel|press\w*|measur\w*|"
               r"inspect\w*|perform\w*|do|conduct\w*|assess\w*|test your|see your|percuss\w*)")
# "exam" alone is not an examination ("this is an exam"): it needs "physical", "full", ... or "of you / now".
_EXAM_NOUNS = (r"(physical exam|(full|quick|complete|general|brief|proper) exam|exam(ination)? (of you|now|you)|examine|"
               r"vital|blood pressure|pulse|heart rate|temperature|reflexes|auscultat|palpat|listen to)")
_TEST_NOUNS = (r"(\btests?\b|testing|blood ?work|\blabs?\b|laborator|\bcbc\b|blood count|blood test|x-?rays?|\bct\b|cat scan|"
               r"\bmri\b|\bscans?\b|ultrasound|sonogra|\becg\b|\bekg\b|\becho|biopsy|urin|culture|swab|panel|imaging|"
               r"spirometr|endoscop|colonoscop|\beeg\b|\bemg\b|serolog|antibod|screen|levels?\b|smear|radiograph|"
               r"electrolyte|metabolic|thyroid|workup|work-up|investigation|angiogra|mammogra|pcr\b)")
_ORDER = (_ACTION + r"|\border\w*|\bsend(ing)? (you|off)|\bget (a|an|some|you)\b|\brun (a|an|some)|\barrange|\bschedule|\brequest")
# Order verbs that make a test order whatever the test is called ("let's order a D-dimer").
_ORDER_STRONG = (r"\b(?:order(?:ing)?|request(?:ing)?|arrang(?:e|ing)|send(?:ing)? you (?:for|to get))\b|\bget (?:a|an|some) "
                 r"[\w -]{2,40} done\b|\b(?:go|went) (?:and get|for) (?:a|an)\b|\bi(?:'d| would) like (?:a|an)\b|"
                 r"\bi (?:want|need) (?:a|an)\b|\bwe need (?:a|an)\b")
_ASKING = r"^(?:do|did|have|has|are|were|is|was|can you tell|could you tell|what|when|how|why|which|any)\b"

_DX_STATEMENT = (
    r"(diagnos(is|ed|e) (is|of|would be|seems)|you (have|'ve got|have got|are suffering from|suffer from|likely have|"
    r"probably have|most likely have|may have|might have)\b(?! (been|had|to|any|you|a history|noticed|ever|felt|experienced))|"
    r"(this|it|that) (is|'s|looks like|sounds like|seems like|appears to be|could be|is likely|is probably|is consistent with)"
    r"(?! (okay|ok|fine|good|alright|all right|great|important|normal|helpful|right|true|possible|hard|difficult|"
    r"an? (exam|game|test|quiz|question|role|joke|training)))|"
    r"i (think|believe|suspect|am confident|'m confident)( that)? (you|this|it|that|your)|consistent with|"
    r"suggestive of|suggests|indicat(es|ive of)|most likely|likely (a|an|to be)|my (working )?(diagnosis|impression)|"
    r"points? to|you('ve| have) got|the (problem|issue|cause|culprit) (is|here is)|is the (diagnosis|problem|cause)|"
    r"(i'm|i am) (fairly |pretty |quite )?(confident|sure|certain))"
)
_PLAN = (r"(treat|therap|prescri|start (you|on)|put you on|medication|antibiotic|steroid|surgery|surgical|operat|"
         r"refer|follow[- ]?up|come back|return (if|in)|admit|monitor|manage|plan\b|recommend|advise|should (take|avoid|"
         r"rest|stop|start|use|drink|eat|see)|take (this|these|it|one|two|the)|rest (and|for)|physiotherapy|"
         r"lifestyle change|injection|dose|mg\b|vaccin|counsel|diet|avoid|"
         r"(we|i)('ll| will| are going to|'re going to|'m going to| am going to| can| should| would like to) "
         r"(start|begin|give|put|try|use|book|schedule))")
_CLOSE = (r"(good ?bye|\bbye\b|take care|that's all|that is all|see you|we're done|we are done|have a (good|nice|great)|"
          r"thank you for coming|you (can|may) go|end (of )?(the|this|our) (consultation|visit|appointment)|get well)")
_ASK_DX = (r"(what (do you think|would you say) (it|this|you)|what('s| is) (your|the) (working )?diagnosis|"
           r"what (do you think )?you (have|'ve got)|do you know what (it|this|you)|tell me (the|your) diagnosis|"
           r"what (disease|condition|illness)( is (it|this)| do you (think you )?have| have you got| are you suffering)|"
           r"have you been told what|what('s| is) wrong with (me|you)|what (did|do) (they|the (other )?doctors?|your gp|"
           r"the specialist) (say|think|call)|what('s| is) (causing|the cause)|cause (of|could)|what (could|might) it be|"
           r"(what|how) would you call|given a name|name (of|your) (the )?(condition|illness|disease)|label|"
           r"has anyone (told|mentioned)|were you told|what (have|were) you (been )?told|suffering from|"
           r"diagn[oó]s(is|tic|tico|i|e\b(?! you))|maladie|krankheit|enfermedad|doen[cç]a|malattia|hastal|"
           r"\u8bca\u65ad|\u75c5|\u0434\u0438\u0430\u0433\u043d\u043e\u0437|\u0627\u0644\u062a\u0634\u062e\u064a\u0635)")
_ASK_RESULTS = (r"(what('s| is| was) (your|the) (blood pressure|temperature|heart rate|pulse|weight|oxygen|sugar|glucose|"
                r"white count|hemoglobin|haemoglobin|\w+ level)|results?|what did (the|your) \w+( \w+)? show|levels?\b|values?\b|what was your|"
                r"what (are|were) your|findings|reading|numbers?)")
# An open question (what / how / tell me ...) asks about a topic; any other question is a yes/no one about a thing.
_OPEN_Q = (r"(?:^|[,;:]\s*)(?:(?:so|ok|okay|and|right|now|alright|well)[,!.]?\s+)*(what|whats|which|who|whom|where|how|hows|why|"
           r"when|wen|tell|describe|explain|walk|talk|please (describe|tell|explain|walk))\b")
# "ok, go ahead, what's wrong": a question after a framing clause, typed without a question mark.
_LATER_QUESTION = r"[,;:]\s*(what|whats|what's|how|when|why|where|which|who|tell me|any)\b"
_ELSE = r"\b(else|other|besides|apart from|otherwise|in general|as well|additional|aside from)\b"
_QUESTION_START = re.compile(
    r"^(?:(?:so|ok|okay|right|and|well|now|alright|hi|hello|morning)[,!.]?\s+)*(do|does|did|are|is|was|were|have|has|had|can|could|would|will|when|what|where|how|why|which|who|any|tell me|"
    r"describe|ever|whats|wats|wat|wen|hows|please (describe|tell|explain|walk)|explain|walk me|talk me|anything|anyone|"
    r"anybody|something|other|apart from|besides|u|ur|since when|(?:pls|plz|please) (?:tell|say|let me know)|r u|ne1)\b")

# Body-part / system words in an exam request, matched against exam keys.
EXAM_TARGETS: dict[str, tuple[str, ...]] = {
    "chest": ("chest", "lung", "respirat", "pulmon", "cardiopulmon", "breath", "thorax"),
    "lung": ("lung", "respirat", "pulmon", "chest", "cardiopulmon", "breath"),
    "breath": ("lung", "respirat", "pulmon", "chest", "breath"),
    "heart": ("heart", "cardi", "cardiopulmon", "murmur"),
    "abdomen": ("abdom", "belly", "bowel", "liver", "spleen", "gastro"),
    "belly": ("abdom", "bowel"), "stomach": ("abdom", "bowel"), "tummy": ("abdom",),
    "neuro": ("neuro", "reflex", "cranial", "motor", "sensat", "gait", "mental"),
    "reflex": ("reflex", "neuro"), "strength": ("motor", "strength", "neuro", "muscul"),
    "skin": ("skin", "derm", "rash", "lesion"), "rash": ("skin", "derm", "rash", "lesion"),
    "eye": ("eye", "ophthalm", "vision", "pupil", "fundus", "retina"), "vision": ("eye", "ophthalm", "vision"),
    "ear": ("ear", "ent", "otoscop"), "throat": ("throat", "ent", "oropharyn", "mouth", "neck"),
    "neck": ("neck", "thyroid", "lymph"), "head": ("head", "heent", "ent", "neuro"),
    "vital": ("vital",), "blood pressure": ("vital", "blood_pressure", "pressure"),
    "pulse": ("vital", "pulse", "heart_rate"), "temperature": ("vital", "temperature"),
    "joint": ("joint", "musculoskelet", "knee", "shoulder", "hand", "hip", "extremit"),
    "knee": ("knee", "musculoskelet", "joint"), "back": ("back", "spine", "musculoskelet"),
    "leg": ("leg", "extremit", "lower", "musculoskelet", "neurovasc"), "arm": ("arm", "extremit", "upper"),
    "pelvi": ("pelvi", "genit", "gyn", "vagin"), "breast": ("breast",), "rectal": ("rectal", "rectum"),
    "mental": ("mental", "psych", "cognit"), "hand": ("hand", "finger", "wrist"),
    "nervous": ("neuro", "reflex", "cranial", "motor", "sensat", "gait"), "foot": ("foot", "feet", "extremit"),
    "spine": ("spine", "back", "musculoskelet"), "mouth": ("mouth", "oral", "throat", "oropharyn"),
}
UNKNOWN_TARGET = "?"


class DoctorIntent(msgspec.Struct, frozen=True):
    """The understood content of one doctor turn."""

    text: str
    is_question: bool = False
    topics: frozenset[str] = frozenset()
    query_stems: tuple[str, ...] = ()  # content words left after cue words: what is asked about
    exam: bool = False  # the doctor examines now
    exam_targets: tuple[str, ...] = ()  # () with exam=True: a general examination
    tests: bool = False  # the doctor orders tests now
    test_stems: tuple[str, ...] = ()  # words naming what is ordered (empty: everything)
    diagnosis: bool = False  # the doctor states a diagnosis
    plan: bool = False  # the doctor gives a treatment / management plan
    closing: bool = False
    asks_diagnosis: bool = False  # the doctor asks the patient to name the diagnosis
    asks_results: bool = False  # the doctor asks for results / measurements
    greeting_only: bool = False
    closed: bool = False  # a yes/no question about one thing ("any chest pain?"), not an open one ("what do you do?")


def _split(text: str) -> list[str]:
    """Sentences of the doctor's turn; a lower-case start after ". " or "? " also begins one (sloppy typing)."""
    return [p for x in sentences(text) for p in re.split(r"(?<=[.!?])\s+(?=[a-z])", x) if p.strip()]


def _has(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


def understand(text: str) -> DoctorIntent:
    """Understand a doctor turn sentence by sentence (see module docstring)."""
    clean = text.replace("’", "'").replace("？", "?").replace("؟", "?").strip()
    low = clean.lower()
    topics: set[str] = set()
    flags = dict(is_question=False, exam=False, tests=False, diagnosis=False, plan=False, closing=False,
                 asks_diagnosis=False, asks_results=False)
    exam_targets: list[str] = []
    test_words: list[str] = []
    closed = False
    # Split the original text: the splitter needs the capital letter that starts the next sentence.
    for sent in [x.lower() for x in _split(clean)] or [low]:
        sent = sent.strip()
        question = sent.endswith("?") or bool(_QUESTION_START.match(sent)) or _has(_LATER_QUESTION, sent)
        polite = not question and _has(_POLITE_ORDER, sent)
        flags["is_question"] |= question
        closed |= question and not _has(_OPEN_Q, sent)
        for topic, cues in _TOPIC_CUES.items():
            if any(_has(c, sent) for c in cues) and question:
                topics.add(topic)
        action = (_has(_ACTION, sent) or polite) and not _has(r"^(do|did|have|has|are|were) you\b", sent)
        if (action and (_has(_EXAM_NOUNS, sent) or _has(r"\b" + _EXAM_VERBS + r"\b.{0,30}\byour\b", sent))
                and not _has(_TEST_NOUNS + r".{0,3}$", sent.rstrip("?.! "))) or _has(_EXAM_IMPERATIVE, sent):
            flags["exam"] = True
            named = [t for t in EXAM_TARGETS if _has(r"\b" + t, sent)]
            # A body part this table does not know gets nothing, not every finding of the case.
            if not named and _has(r"\byour (?!body\b|whole\b)[a-z]{3,}", sent):
                named = [UNKNOWN_TARGET]
            exam_targets += named
        ordered = (_has(_TEST_NOUNS, sent) and (_has(_ORDER, sent) or polite)) or _has(_ORDER_STRONG, sent)
        if ordered and not _has(_ASKING, sent) or _has(r"^(could|can|would) you (please )?(go and )?(get|have)\b", sent):
            flags["tests"] = True
            test_words += [w for w in content_stems(sent) if w not in _ORDER_WORDS]
        if not question and _has(_DX_STATEMENT, sent):
            flags["diagnosis"] = True
        if not question and _has(_PLAN, sent):
            flags["plan"] = True
        if _has(_CLOSE, sent):
            flags["closing"] = True
        if question and _has(_ASK_DX, sent):
            flags["asks_diagnosis"] = True
        if question and _has(_ASK_RESULTS, sent):
            flags["asks_results"] = True
    if flags["diagnosis"] and not flags["plan"] and flags["tests"]:
        flags["diagnosis"] = _has(r"you (have|'ve got)|diagnosis is|i (think|believe|suspect)", low)
    query = tuple(s for s in content_stems(low) if s not in _CUE_WORDS)
    greeting = bool(re.fullmatch(r"\W*(hi|hello|hey|good (morning|afternoon|evening)|greetings)( there)?( doctor| dr)?[\s\W]*"
                                 r"(i'm|i am|my name is)?[\w .,'-]{0,30}\W*", low)) and not flags["is_question"]
    if _has(_ELSE, low) and topics & {"complaint", "course"} and not topics - {"complaint", "course", "symptoms"}:
        topics = {"symptoms"}  # "anything else bothering you?" asks past the main complaint
    if not topics and flags["is_question"] and not (flags["asks_diagnosis"] or flags["asks_results"]):
        # An open question on no known topic is about why they came; a yes/no one about some symptom.
        topics.add("symptoms" if query and closed or _has(_ELSE, low) else "complaint")
    return DoctorIntent(text=text, topics=frozenset(topics), query_stems=query, exam_targets=tuple(dict.fromkeys(exam_targets)),
                        test_stems=tuple(dict.fromkeys(test_words)), greeting_only=greeting, closed=closed,
                        **flags)


# Words that carry the doctor's speech act, not the thing asked about.
_CUE_WORDS = frozenset(stem(w) for w in """ask tell know think describe start begin began since long when ever
    any other anything else symptom notice feel feeling problem issue thing today bring brings come came happen
    history past medical medication medicine take taking current right now lately recent recently little bit please
    would could should like let examine exam check look listen order test run get some okay alright doctor sir
    mam madam thank thanks good great sure see going go will time also kind sort much many often how what help
    bother bothering issue issues seem seems main worry worrying wrong up sudden suddenly gradual gradually quickly
    worse better same staying constant wen unwell otherwise unusual general complaints besides apart seriously ill
    hx diagnosed admission admissions hospital previous before social describe do noticed noticing hi hello hey
    whats wen significant serious ongoing regularly daily matter story troubling morning made moment minute present
    presently currently nowadays anymore still trouble troubles bit aware body change changes lately own words probs prob u ur r pls plz wat ne1 sth""".split())
_ORDER_WORDS = _CUE_WORDS | frozenset(stem(w) for w in """order send arrange schedule request need want confirm some few one today done right away
    additionally well quickly urgently first next then too get go please now for me sending ordering""".split()) | STOPWORDS
