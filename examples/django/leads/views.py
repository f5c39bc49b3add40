"""Two views: one creates a lead and publishes lead.created in one transaction; the other
does the same, then fails, so both the lead and its event roll back."""

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from outbox import publish

from .models import Lead


class LeadImportFailed(Exception):
    """Something after the publish went wrong (a failed save, a bad call, a bug)."""


def _create_and_publish(request: HttpRequest) -> tuple[Lead, str]:
    lead = Lead.objects.create(
        email=request.POST["email"], tenant=request.POST.get("tenant", "acme")
    )
    metadata = {}
    if "X-Request-ID" in request.headers:
        metadata["correlation_id"] = request.headers["X-Request-ID"]
    event_id = publish(
        "lead.created",
        {"lead_id": lead.id, "email": lead.email, "created_at": lead.created_at},
        tenant=lead.tenant,
        ordering_key=f"lead:{lead.id}",
        metadata=metadata,
    )
    return lead, str(event_id)


@csrf_exempt  # an example API endpoint; keep CSRF protection for browser forms
@require_POST
def create_lead(request: HttpRequest) -> JsonResponse:
    # The lead and its event commit together, or neither does.
    with transaction.atomic():
        lead, event_id = _create_and_publish(request)
    return JsonResponse({"lead_id": lead.id, "event_id": event_id}, status=201)


@csrf_exempt
@require_POST
def create_lead_then_fail(request: HttpRequest) -> JsonResponse:
    # The exception leaves the atomic block, which rolls back: no lead, and no event,
    # although publish() had already inserted it (in this same transaction).
    with transaction.atomic():
        lead, event_id = _create_and_publish(request)
        raise LeadImportFailed(f"failed after publishing {event_id} for lead {lead.id}")
