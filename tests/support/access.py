"""What a ServiceAccount may do, asked of the real API server (SubjectAccessReview)."""

from __future__ import annotations


def service_account_user(namespace: str, name: str) -> dict:
    """The user and groups the API server authenticates a ServiceAccount's token as."""
    return {
        "user": f"system:serviceaccount:{namespace}:{name}",
        "groups": [
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        ],
    }


def allowed(
    api_client,
    who: dict,
    group: str,
    resource: str,
    verb: str,
    namespace: str | None,
    name: str | None = None,
):
    """SubjectAccessReview (asked as admin): may ``who`` do ``verb`` on ``resource`` (the object
    ``name``, if given)?"""
    import kubernetes

    plural, _, sub = resource.partition("/")
    attrs = {"group": group, "resource": plural, "verb": verb}
    for key, value in (("subresource", sub), ("namespace", namespace), ("name", name)):
        if value:
            attrs[key] = value
    review = kubernetes.client.AuthorizationV1Api(api_client).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {**who, "resourceAttributes": attrs},
        }
    )
    return review.status.allowed
