"""Dependency-token insertion: any logical stream gets tokens that balance and never deadlock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from spatten_compiler.backend.deps import check_deps
from spatten_compiler.backend.isa import make
from spatten_compiler.backend.tokens import insert_tokens

BY_STAGE = {"load": "load", "compute": "gemm", "store": "store", "barrier": "sync.compute"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(BY_STAGE)), min_size=1, max_size=60))
def test_inserted_tokens_balance_and_never_deadlock(kinds: list[str]) -> None:
    instrs = [make(BY_STAGE[k]) for k in kinds] + [make("finish")]
    barriers = {i for i, k in enumerate(kinds) if k == "barrier"}
    out, index = insert_tokens(instrs, barriers)
    check_deps(out)  # raises on deadlock or leftover tokens
    assert [out[index[i]].mnemonic for i in range(len(instrs))] == [i.mnemonic for i in instrs]
    assert out[-1].mnemonic == "finish"
    assert all(i.mnemonic.startswith("sync.") for k, i in enumerate(out) if k not in set(index.values()))


def test_loads_run_at_most_two_groups_ahead() -> None:
    kinds = ["load", "compute"] * 5
    instrs = [make(BY_STAGE[k]) for k in kinds] + [make("finish")]
    out, _ = insert_tokens(instrs, set())
    loads = [i for i in out if i.stage == "load"]
    assert [i.dep("pop_next") for i in loads] == [False, False, True, True, True]
