from django.db import models


class Lead(models.Model):
    email = models.EmailField()
    tenant = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.email} ({self.tenant})"
