from django.urls import path

from leads import views

urlpatterns = [
    path("leads/", views.create_lead, name="create-lead"),
    path("leads/create-then-fail/", views.create_lead_then_fail, name="create-lead-then-fail"),
]
