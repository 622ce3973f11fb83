"""The on-disk contract between :mod:`jaxreco.export` (writer) and :mod:`jaxreco.serve`.

Pure constants: importing this module pulls in neither JAX nor TensorFlow, so the exporter
(which has JAX) and the server (which must not) agree on names without depending on each
other.

Layout of one exported model (TF Serving's versioned layout)::

    <model_dir>/
      <version>/                  a positive integer; the highest one is served
        saved_model.pb
        variables/
        assets/
          user_vocab.txt          line i = raw id of user index i (UTF-8, one per line)
          item_vocab.txt          line i = raw id of item index i
          item_category.txt       optional, line i = category of item i
        assets.extra/
          jaxreco.json            metadata (see ``METADATA_FILE``), ignored by TF Serving

A version directory appears atomically: the exporter writes ``<model_dir>/.tmp-*`` and
renames it, so a watcher never sees half a model.
"""

from __future__ import annotations

FORMAT_VERSION = 1

USER_VOCAB_FILE = "user_vocab.txt"
ITEM_VOCAB_FILE = "item_vocab.txt"
ITEM_CATEGORY_FILE = "item_category.txt"
METADATA_FILE = "jaxreco.json"  # under assets.extra/

# Signature names and their tensors.
SIG_SCORE = "score"                # user[b] str, item[b] str -> score[b] f32, known[b] bool
SIG_RECOMMEND = "recommend"        # user[b] str, k [] i32 -> items[b,k] str, scores[b,k], known[b]
SIG_SIMILAR = "similar_items"      # item[b] str, k [] i32 -> items, scores, co_counts, known
SIG_USER_SCORES = "user_scores"    # user[b] str -> scores[b, num_items] f32, known[b]
SIG_DEFAULT = "serving_default"    # same function as ``recommend``
# A shopper's recent items (a session): user[b] str ("" = anonymous), items[b,n] str (raw
# ids, "" = padding), events[b,n] str (event type, "" = unknown), ts[b,n] f64 (unix s, 0 =
# unknown) -> scores[b, num_items] f32 (seen and session items excluded), known[b] bool
# (the user), session_known[b] i32 (session items the model knows, the ones it used).
SIG_SESSION_SCORES = "session_scores"
# The same inputs and k [] i32 -> items[b,k] str, scores[b,k], known[b], session_known[b].
SIG_RECOMMEND_SESSION = "recommend_session"
# Sequential models (explain=true): the same inputs as session_scores -> weights[b, L] f32
# (the encoder's attention of the last position, rollout over the blocks, over the L input
# positions of the sequence session_scores encodes; sums to 1 over the non-padding ones),
# items[b, L] str (each position's item, "" = padding), known[b], session_known[b].
SIG_SESSION_ATTENTION = "session_attention"
SIGNATURES = (SIG_SCORE, SIG_RECOMMEND, SIG_SIMILAR, SIG_USER_SCORES, SIG_DEFAULT,
              SIG_SESSION_SCORES, SIG_RECOMMEND_SESSION)
# How session_scores uses the session (metadata "session"."mode"): "foldin" (dot/iALS
# models: the user vector solved from the items), "sequential" (the encoder runs on the last
# max_len items), "exclude" (other models: the user's scores, session items excluded).
SESSION_MODES = ("foldin", "sequential", "exclude")
# Models of a ctr run only: user[b] str, item[b] str, one int32[b] per context feature
# (metadata "context_features") -> one float32[b] per head (probability; a ``rating`` head's
# value), known[b] bool.
SIG_PREDICT_CTR = "predict_ctr"

# Score given to items that must never be recommended (already seen, the query item
# itself). Finite, so that TF Serving's JSON output stays valid; callers drop such entries.
EXCLUDED_SCORE = -3.4028234663852886e38  # float32 lowest


def is_version_dir_name(name: str) -> bool:
    """True for TF Serving version directory names: a positive decimal integer."""
    return name.isdigit() and int(name) > 0
