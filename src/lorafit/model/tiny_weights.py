"""Constructed (not random) weights for the embedded tiny model, so an adapter learns the quickstart in a minute.

A random 4-layer base cannot copy a token it has read into its answer: with frozen random embeddings, head and
attention, a rank-16 adapter has to build the whole copy path (where am I in the answer, which word of the
sentence to read, how to write it back) and, in a minute of CPU training, learns only the answer's shape
(``{"name": "Elena Petrov", "city": "Lisbon"}`` for every input). A pretrained model has those parts already;
these weights give the tiny base the same parts, with no training and no download:

- **Embeddings by word.** A token's embedding holds a fixed random vector of its word (leading space removed),
  repeated in each attention head's slice so that any single head can copy the whole word; a second, independent
  vector of the word (its "features", which a key can classify); a "leading space" direction, so
  ``ĠLisbon`` (in the sentence) and ``Lisbon`` (in the JSON answer) are the same word told apart by one
  component; and one constant "bias" direction, which lets a head attend by position alone.
- **Words of a kind lie near each other** (person names, surnames, cities, occupations, numbers share part of
  their features), as they do in any pretrained model's embeddings. Which words are of which kind comes from the
  sample task's word lists (data/sample.py): the base knows "Lisbon and Oslo are alike", not "a city goes after
  ``"city": "``".
- **Two previous-token heads.** Head 0 of layers 0 and 1 attends to the previous position (query and key read
  the bias direction; their rotary angles are offset by one position) and writes what it reads into a subspace of
  its own: layer 0 a projection of the previous word, layer 1 the one before it. A position in the answer then
  knows the two tokens before it (``city``, ``":``), which says which field comes next.
- **The head reads a rotated embedding space, and the last layer copies into it**: its value projection is the
  identity and its output projection the same rotation, so the word an attention head of that layer attends to is
  predicted next, while the current token (held unrotated in the residual stream) is not. Which position to
  attend to (the city in the sentence at ``"city": "``) is what the adapter learns.

Everything else keeps transformers' random initialisation, and the base knows nothing about the task: held-out
``json_valid`` and ``field_accuracy`` are 0 before training (tests/test_cli.py::test_quickstart_learns). All the
subspaces are exactly orthogonal, so the parts do not read each other's signal. docs/design.md says why.
"""

from __future__ import annotations

import torch

from lorafit.hashing import sha256_text

HEAD_SCALE = 2.0       # logit = HEAD_SCALE x <word, normalised state> / sqrt(hidden): a near-certain answer is reachable
SPACE_WEIGHT = 0.5     # the "leading space" direction's norm, relative to a word vector's
BIAS_WEIGHT = 1.0      # the constant direction's norm, relative to a word vector's
POSITION_PAIRS = 8     # rotary frequency pairs the previous-token heads use: the fastest 8 give a unique maximum
# Attention logit margin of the previous position over the next best one: 4 puts ~95% of the weight there. Sharper
# heads copy no better and hurt float32: a saturated softmax's backward subtracts nearly equal numbers (error
# ~eps / (1 - p)), which broke the 1e-5 batch-layout parity tests at margin 5 and above.
POSITION_SHARPNESS = 4.0
BACK_WIDTH = 32        # what a previous-token head writes: a projection of the word, enough to tell words apart
KIND_WEIGHT = 0.8      # share of a word's features its kind gives (without kinds, occupations were not copied reliably)
FEATURE_WEIGHT = 1.0   # a word's second, independent vector (its "features"), relative to its copied vector


def word_of(token: str) -> str:
    """The word a byte-level BPE token spells, without its leading space marker (``Ġ``). Case stays: ``Red`` and
    ``red`` are different words to the head (one vector would tie their logits)."""
    return token.removeprefix("Ġ")


def word_kinds() -> dict[str, str]:
    """Words the tiny model knows a kind of: person names, surnames, cities, occupations, numbers."""
    from lorafit.data import sample

    kinds = {str(n): "number" for n in range(1000)}
    for kind, words in (("first name", sample.FIRST_NAMES), ("surname", sample.LAST_NAMES), ("city", sample.CITIES),
                        ("occupation", sample.JOBS)):
        kinds.update({word.lower(): kind for word in words})
    return kinds


def _gaussian(name: str, *shape: int) -> torch.Tensor:
    # Seeded by a name, so a token's vector does not depend on its id or on the vocabulary's order.
    seed = int(sha256_text(name)[:16], 16)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _subspaces(hidden: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Orthonormal bases: ``words`` (a head_dim vector repeated in every head slice), then, mutually orthogonal in
    the rest of the hidden space, ``bias`` and ``space`` (one direction each), ``back1`` and ``back2`` (what the
    previous-token heads write, ``BACK_WIDTH`` wide) and ``features`` (all that is left)."""
    heads = hidden // head_dim
    words = torch.eye(head_dim).repeat(heads, 1) / heads**0.5  # (hidden, head_dim), orthonormal columns
    rest = _gaussian("lorafit tiny subspaces", hidden, hidden - head_dim)
    rest -= words @ (words.T @ rest)  # remove the word subspace, then orthonormalise the remainder
    rest = torch.linalg.qr(rest)[0]
    split = [1, 1, BACK_WIDTH, BACK_WIDTH, rest.shape[1] - 2 - 2 * BACK_WIDTH]
    bias, space, back1, back2, features = torch.split(rest, split, dim=1)
    return {"words": words, "bias": bias[:, 0], "space": space[:, 0], "back1": back1, "back2": back2,
            "features": features}


def _rotate(vector: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """transformers' rotary convention (rotate_half: pair i with i + head_dim/2), by ``angles`` per pair."""
    half = vector.shape[0] // 2
    first, second = vector[:half], vector[half:]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.cat([first * cos - second * sin, second * cos + first * sin])


def construct_weights(model, tokenizer) -> None:
    """Overwrite embeddings, head, two previous-token heads and the copying last layer in place (module doc)."""
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    base = _subspaces(hidden, head_dim)
    word_norm = hidden**0.5  # each embedding component ~1, like the RMS-normalised states the layers see

    kinds = word_kinds()
    rows = torch.zeros(config.vocab_size, hidden)
    for token_id in range(config.vocab_size):
        token = tokenizer.convert_ids_to_tokens(token_id) or f"<unused {token_id}>"
        word = _gaussian(f"word {word_of(token)}", head_dim)
        features = _gaussian(f"features {word_of(token)}", base["features"].shape[1])
        kind = kinds.get(word_of(token).lower())
        if kind is not None:  # words of one kind lie near each other, as in a pretrained model's embeddings
            kind_vector = _gaussian(f"kind {kind}", base["features"].shape[1])
            features = (features / features.norm() * (1 - KIND_WEIGHT**2) ** 0.5
                        + kind_vector / kind_vector.norm() * KIND_WEIGHT)
        rows[token_id] = (base["words"] @ (word / word.norm())
                          + base["features"] @ (features / features.norm()) * FEATURE_WEIGHT) * word_norm
        if token.startswith("Ġ"):
            rows[token_id] += base["space"] * word_norm * SPACE_WEIGHT
    rotation = torch.linalg.qr(_gaussian("lorafit tiny head rotation", hidden, hidden))[0]
    bias = base["bias"] * word_norm * BIAS_WEIGHT

    # The previous-token query/key: a fixed head_dim vector from the bias direction, the key turned one position
    # forward, so <q at m, k at n> peaks at n = m - 1 (checked in tests/test_tiny_model.py).
    theta = getattr(config, "rope_parameters", None) or {}
    inv_freq = 1.0 / (float(theta.get("rope_theta", 10000.0)) ** (torch.arange(0, head_dim, 2).float() / head_dim))
    query = torch.zeros(head_dim)
    query[:POSITION_PAIRS] = 1.0
    query[head_dim // 2:head_dim // 2 + POSITION_PAIRS] = 1.0
    key = _rotate(query, inv_freq)
    margin = 1 - max(float((torch.cos(d * inv_freq[:POSITION_PAIRS])).mean()) for d in range(1, 64))
    # what the bias direction reads after RMSNorm, on average over the vocabulary: |bias| / RMS(embedding)
    bias_read = float((word_norm * BIAS_WEIGHT / ((rows + bias).norm(dim=1) / word_norm)).mean())
    size = (POSITION_SHARPNESS * head_dim**0.5 / (margin * 2 * POSITION_PAIRS)) ** 0.5 / bias_read

    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(rows + bias)
        model.lm_head.weight.copy_(rows @ rotation.T * HEAD_SCALE / hidden**0.5)
        head0 = slice(0, head_dim)
        # layer 0 reads a fixed BACK_WIDTH projection of the word; layer 1 reads what layer 0 wrote
        project = torch.linalg.qr(_gaussian("lorafit tiny back projection", head_dim, BACK_WIDTH))[0]
        back = slice(0, BACK_WIDTH)
        for layer, read, write in ((0, base["words"] @ project, base["back1"]), (1, base["back1"], base["back2"])):
            attn = model.model.layers[layer].self_attn
            attn.q_proj.weight[head0] = size * torch.outer(query, base["bias"])
            attn.k_proj.weight[head0] = size * torch.outer(key, base["bias"])
            attn.v_proj.weight[head0] = 0.0
            attn.v_proj.weight[back] = read.T
            attn.o_proj.weight[:, head0] = 0.0
            attn.o_proj.weight[:, back] = write
        last = model.model.layers[-1].self_attn
        # Its keys read a word's features (where its kind lies), as a pretrained model's keys carry what a word is;
        # its queries stay random, so the base attends nowhere in particular. What the adapter learns is the query:
        # which kind to look for at which place in the answer (with random keys as well, 1 draw in 3 of these
        # weights left the city or the occupation uncopied after the quickstart's 2 epochs; with these, none of 5).
        width = base["features"].shape[1]
        for head in range(heads):
            project = torch.linalg.qr(_gaussian(f"lorafit tiny copy keys {head}", width, head_dim))[0]
            last.k_proj.weight[head * head_dim:(head + 1) * head_dim] = project.T @ base["features"].T
        last.v_proj.weight.copy_(torch.eye(hidden))  # no GQA in the tiny model: value width == hidden
        last.o_proj.weight.copy_(rotation)
