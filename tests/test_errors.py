"""`yolos_jax.errors.describe_error`: the one line a user-facing message quotes from a storage library's exception
(orbax, TensorStore): the status line of the cause chain, payloads dropped, the middle of a long line cut."""

from yolos_jax.errors import MissingInputError, UserError, describe_error


def test_describe_error_takes_the_storage_status_line():
    try:
        try:
            raise ValueError('OUT_OF_RANGE: Error reading "a/0" in OCDBT database\nmore lines')
        except ValueError as inner:
            raise Exception("Encountered error while reading array index: <bound method spec of TensorStore({") from inner
    except Exception as e:  # noqa: BLE001
        assert describe_error(e) == 'OUT_OF_RANGE: Error reading "a/0" in OCDBT database'
    assert describe_error(FileNotFoundError(2, "No such file")) == "FileNotFoundError: [Errno 2] No such file"
    cut = describe_error(RuntimeError("head " + "x" * 1000 + " tail"))
    assert len(cut) <= 300 and cut.startswith("RuntimeError: head") and cut.endswith(" tail") and " ... " in cut


def test_describe_error_drops_tensorstores_spec_payload_and_keeps_the_reason():
    # The message TensorStore gave for a write past RLIMIT_FSIZE (its spec payload shortened here: it is longer
    # than the quoted line's limit there, and cutting the middle dropped 'File too large').
    spec = "{\\\"context\\\":{\\\"cache_pool\\\":{}},\\\"driver\\\":\\\"zarr\\\"," + "\\\"x\\\":1," * 60 + "}"
    message = ('OUT_OF_RANGE: Error opening "zarr" driver: Error writing "pos_embed_patches/.zarray" in OCDBT database '
               'at local file "/tmp/run/checkpoints/20/": Failed writing: "/tmp/run/d/ab.__lock": Failed to write 118 '
               f"bytes to file 3: File too large [tensorstore_spec='{spec}'] [source locations='a.cc:1\\nb.cc:2'] "
               "[os_error_code='27']")
    assert len(message) > 600
    described = describe_error(ValueError(message))
    assert described == ('OUT_OF_RANGE: Error opening "zarr" driver: Error writing "pos_embed_patches/.zarray" in OCDBT '
                         'database at local file "/tmp/run/checkpoints/20/": Failed writing: "/tmp/run/d/ab.__lock": '
                         "Failed to write 118 bytes to file 3: File too large [os_error_code='27']")


def test_describe_error_names_the_type_of_a_message_that_does_not_explain_itself():
    assert describe_error(KeyError("params")) == "KeyError: 'params'"
    assert describe_error(RuntimeError()) == "RuntimeError"


def test_describe_error_quotes_a_user_error_whole():
    """A UserError's message is written to be the report: quoted as it is, neither typed nor cut in the middle
    (export.py quoted 'no checkpoint found at ...' cut before its advice)."""
    assert describe_error(UserError("workdir is in use")) == "workdir is in use"
    advice = "no checkpoint found at /x: expected a converted-weights directory " + "(with ...) " * 40 + "or a step"
    assert describe_error(MissingInputError(advice)) == advice and len(advice) > 300
    assert describe_error(UserError("two\nlines")) == "two lines"
