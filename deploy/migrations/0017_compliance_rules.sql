-- A rule kind for compliance alarms (rmiot.compliance_alarms): calibration,
-- metrology and inspection tasks raise, escalate and clear alarms under a
-- hospital's rule compliance.<kind>. The platform raises them from the tasks'
-- state; the ingest rule engine never evaluates this kind on telemetry.
ALTER TABLE alarm_rules DROP CONSTRAINT alarm_rules_kind_check;
ALTER TABLE alarm_rules ADD CONSTRAINT alarm_rules_kind_check
    CHECK (kind IN ('threshold', 'rate', 'offline', 'fault', 'battery', 'zone', 'energy',
                    'filter', 'compliance'));

-- The placeholder rules made before this kind existed (kind fault, disabled).
UPDATE alarm_rules SET kind = 'compliance', enabled = true,
       name = replace(name, ' (compliance tasks; kept disabled)', ' (compliance tasks)')
 WHERE code LIKE 'compliance.%' AND kind = 'fault' AND NOT enabled;
