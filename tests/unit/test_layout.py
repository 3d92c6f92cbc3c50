from dreambooth_contract.layout import join_uri


def test_join_uri_keeps_the_base_scheme_and_root():
    assert (
        join_uri("s3://bucket/jobs/dog/", "export", "pipeline")
        == "s3://bucket/jobs/dog/export/pipeline"
    )
    assert join_uri("/data/out", "/trained/") == "/data/out/trained"
    assert join_uri("s3://bucket", "") == "s3://bucket"


def test_join_uri_joins_bare_keys():
    assert join_uri("", "checkpoints", "checkpoint-00000002") == "checkpoints/checkpoint-00000002"
    assert join_uri("a/", "/b", "", "c/") == "a/b/c"
