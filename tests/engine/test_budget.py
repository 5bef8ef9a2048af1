

def test_new_ids_are_32_hex_digits_and_do_not_repeat():
    from extproc.engine.budget import new_id

    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
