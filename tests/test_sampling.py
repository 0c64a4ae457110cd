from itertools import islice

from hypothesis import given, settings
from hypothesis import strategies as st

from mame_lightning.data.loading.sampling import ResumableStreamSampler


def take(sampler, k):
    return list(islice(iter(sampler), k))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 8), start=st.integers(0, 20), seed=st.integers(0, 5))
def test_resumed_stream_equals_tail_of_uninterrupted_stream(n, batch, start, seed):
    full = take(ResumableStreamSampler(n, batch, seed=seed), (start + 5) * batch)
    resumed = take(ResumableStreamSampler(n, batch, seed=seed, start_batch=start), 5 * batch)
    assert resumed == full[start * batch:]


def test_each_pass_is_a_permutation_and_passes_differ():
    n = 12
    stream = take(ResumableStreamSampler(n, 4, seed=3), 3 * n)
    passes = [stream[i * n:(i + 1) * n] for i in range(3)]
    for p in passes:
        assert sorted(p) == list(range(n))
    assert passes[0] != passes[1]
    assert take(ResumableStreamSampler(n, 4, seed=4), n) != passes[0]


def test_ranks_split_the_same_stream_without_overlap():
    n, batch, world = 16, 2, 2
    global_stream = take(ResumableStreamSampler(n, batch, seed=1), n)
    rank_streams = [take(ResumableStreamSampler(n, batch, seed=1, rank=r, world_size=world), n // world)
                    for r in range(world)]
    assert sorted(rank_streams[0] + rank_streams[1]) == list(range(n))
    # rank r takes global batches r, r + world, ...
    assert rank_streams[1][:batch] == global_stream[batch:2 * batch]


def test_for_trainer_starts_after_the_micro_batches_already_consumed():
    from types import SimpleNamespace

    trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, global_rank=1, world_size=2)
    sampler = ResumableStreamSampler.for_trainer(10, 2, seed=7, trainer=trainer)
    assert (sampler.start_batch, sampler.rank, sampler.world_size) == (6, 1, 2)
    fresh = ResumableStreamSampler.for_trainer(10, 2, seed=7)
    assert (fresh.start_batch, fresh.rank, fresh.world_size) == (0, 0, 1)
